"""The learner's Prometheus metrics (``dipo_learner_*``); learner/app.py serves them."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from learner.batch import StepBatch
from learner.weight_sync import BroadcastReport
from services.contracts import CONSUMER_GROUPS
from services.contracts import MetricKey as K
from services.metrics import ComponentMetrics
from services.streams import run_key

log = logging.getLogger(__name__)

_GAUGES = {  # metrics.jsonl key -> (metric, labels)
    K.REWARD_MEAN: ("reward_mean", {}),
    K.ACCURACY: ("accuracy", {}),
    K.TAU: ("tau", {}),
    K.GATE_OPEN_RATIO: ("gate_open_ratio", {}),
    K.ENTROPY: ("entropy", {}),
    K.KL_BEHAVIOUR: ("kl_behaviour", {}),
    K.LOSS: ("loss", {}),
    K.GRAD_NORM: ("grad_norm", {}),
    K.LR: ("learning_rate", {}),
}

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
"""Seconds, for step, wait, broadcast and checkpoint times: measured steps, waits and syncs run 5-54 s on the 2-core
CPU machine and well under a second on GPUs, and a checkpoint of a large model takes minutes; so the buckets span
50 ms to 30 min, about two per decade below 1 s and finer where the CPU runs live."""
MEMORY_WARN_RATIO = 0.8
"""Share of Redis's maxmemory above which the learner warns (the alert DipoRedisMemoryNearLimit uses the same)."""
QUADRANTS = ("CL", "CH", "EL", "EH")
"""Correctness (C correct, E error) x perplexity (L below tau*, H above): metrics.jsonl's quad_<name> shares."""


class LearnerMetrics:
    """Every learner metric, on its own registry."""

    def __init__(self) -> None:
        m = ComponentMetrics("learner")
        self.component = m
        self.gauges = {key: m.gauge(name, f"{key} of the last step (see docs/METRICS.md)") for key, (name, _) in
                       _GAUGES.items()}  # fmt: skip
        self.step = m.gauge("step", "Optimizer steps done.")
        self.version = m.gauge("policy_version", "Policy version v.")
        self.kind_share = m.gauge("group_kind_share", "Share of easy/normal/hard groups in the last step.", ["kind"])
        self.reallocations = m.counter("reallocations", "Triggered reallocations consumed.", ["action"])
        self.ppl = m.gauge("ppl_mean", "Mean perplexity by correctness in the last step.", ["correct"])
        self.clip = m.gauge("clip_fraction", "Token share clipped low / high.", ["side"])
        self.iw = m.gauge("importance_weight", "Truncated importance weight mean / max.", ["stat"])
        self.staleness = m.gauge("staleness", "Version lag of the groups used: mean / max.", ["stat"])
        self.dropped = m.counter("dropped_groups", "Groups dropped, by reason.", ["reason"])
        self.used = m.counter("used_groups", "Groups used in optimizer updates.")
        self.skipped_updates = m.counter(
            "skipped_updates", "Optimizer updates skipped for a non-finite loss or gradient norm.", ["reason"]
        )
        self.released = m.counter("prompts_released", "Prompts released by the feeder.")
        self.quadrant = m.gauge("quadrant_share", "Share of the last step's responses in a correctness x "
                                "perplexity quadrant (CL, CH, EL, EH).", ["quadrant"])  # fmt: skip
        self.last_step_time = m.gauge(
            "last_step_timestamp_seconds", "Unix time of the last optimizer step (of the process start before one)."
        )
        self.last_step_time.set(time.time())  # a learner that never steps after a (re)start still ages
        buckets = DURATION_BUCKETS
        self.step_seconds = m.histogram("step_seconds", "Wall time of one optimizer step.", buckets=buckets)
        self.wait_seconds = m.histogram("wait_seconds", "Time waiting for scored groups per step.", buckets=buckets)
        self.sync_seconds = m.histogram("weight_sync_seconds", "Broadcast time of one weight update.", buckets=buckets)
        self.sync_wait_seconds = m.histogram(
            "sync_wait_seconds", "Time a step waited for the previous publication to finish.", buckets=buckets
        )
        self.canary_mismatches = m.counter(
            "canary_mismatches", "Rollout servers quarantined: their canary disagreed with the learner's for a version."
        )
        self.sync_rejected_events = m.counter(
            "sync_rejected_events", "Weight-sync membership events dropped: malformed, or without the run's secret.",
            ["reason"],
        )  # fmt: skip
        self._rejected_seen: dict[str, int] = {}
        self.checkpoint_seconds = m.histogram("checkpoint_seconds", "Time to write one checkpoint.", buckets=buckets)
        self.stream_length = m.gauge("stream_length", "Entries in a stream of the run.", ["stream"])
        self.stream_pending = m.gauge("stream_pending", "Pending entries of the stream's consumer group.", ["stream"])
        self.redis_memory = m.gauge(
            "redis_memory_bytes", "Redis memory: used, and its maxmemory (0: no limit), sampled after each step.",
            ["kind"],
        )  # fmt: skip
        self._memory_warned = False
        self._last_dropped: dict[str, int] = {}
        self._released_seen = 0
        self._quarantined_seen = 0

    def on_step(self, line: dict[str, Any], batch: StepBatch) -> None:
        """Update every metric from one metrics.jsonl line."""

        def num(key: str) -> float:
            value = line.get(key)
            return float(value) if isinstance(value, int | float) else float("nan")

        for key, gauge in self.gauges.items():
            gauge.set(num(key))
        self.step.set(line[K.STEP])
        self.version.set(line[K.VERSION])
        for kind in ("easy", "normal", "hard"):
            self.kind_share.labels(kind).set(num(f"kind_{kind}"))
        for action in ("reward", "penalty"):
            self.reallocations.labels(action).inc(num(f"realloc_{action}") or 0)
        for name in QUADRANTS:
            self.quadrant.labels(name).set(num(K.quadrant(name)))
        self.last_step_time.set(time.time())
        self.ppl.labels("1").set(num("ppl_correct"))
        self.ppl.labels("0").set(num("ppl_wrong"))
        self.clip.labels("low").set(num("clip_low"))
        self.clip.labels("high").set(num("clip_high"))
        self.iw.labels("mean").set(num("is_weight_mean"))
        self.iw.labels("max").set(num("is_weight_max"))
        self.staleness.labels("mean").set(num("staleness_mean"))
        self.staleness.labels("max").set(num("staleness_max"))
        for reason in ("stale", "no_signal", "duplicate", "provenance"):  # metrics.jsonl holds running totals
            total = int(line.get(f"dropped_{reason}") or 0)
            self.dropped.labels(reason).inc(max(0, total - self._last_dropped.get(reason, 0)))
            self._last_dropped[reason] = total
        self.used.inc(len(batch.used))
        for reason, key in (("nonfinite_loss", K.SKIPPED_NONFINITE_LOSS), ("nonfinite_grad", K.SKIPPED_NONFINITE_GRAD)):
            self.skipped_updates.labels(reason).inc(int(line.get(key) or 0))
        released = int(line.get(K.PROMPTS_RELEASED) or 0)
        self.released.inc(max(0, released - self._released_seen))
        self._released_seen = released
        self.step_seconds.observe(num(K.STEP_SECONDS) if line.get(K.STEP_SECONDS) else 0.0)
        self.wait_seconds.observe(num("wait_seconds"))
        self.sync_wait_seconds.observe(float(line.get(K.SYNC_WAIT_SECONDS) or 0.0))
        if line.get(K.CHECKPOINT_SECONDS):
            self.checkpoint_seconds.observe(num("checkpoint_seconds"))

    async def observe_streams(self, redis: aioredis.Redis, run: str) -> None:
        """Record each stream's length and its consumer group's pending count (best effort: a metric, not control)."""
        for name, group in CONSUMER_GROUPS.items():
            key = run_key(run, name)
            try:
                self.stream_length.labels(name).set(await redis.xlen(key))
                pending = 0
                if group is not None:
                    for row in await redis.xinfo_groups(key):
                        if (row.get("name") or row.get(b"name")) in (group, group.encode()):
                            pending = int(row.get("pending", row.get(b"pending", 0)))
                self.stream_pending.labels(name).set(pending)
            except (RedisError, OSError) as exc:  # a missing stream or a Redis hiccup must not stop training
                log.debug("stream metrics for %s unavailable: %s", key, exc)

    async def observe_redis_memory(self, redis: aioredis.Redis) -> None:
        """Record Redis's memory use and limit; warn (once per crossing) above MEMORY_WARN_RATIO of the limit."""
        try:
            info = await redis.info("memory")
        except (RedisError, OSError) as exc:  # a metric, not control
            log.debug("Redis memory metrics unavailable: %s", exc)
            return
        used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        self.redis_memory.labels("used").set(used)
        self.redis_memory.labels("max").set(limit)
        near = limit > 0 and used > MEMORY_WARN_RATIO * limit
        if near and not self._memory_warned:
            log.warning("Redis uses %.0f %% of its maxmemory (%d of %d MiB): at the limit it refuses writes and the "
                        "pipeline stalls; lower streams.retain_acked_s or raise redis.maxmemory_mb",
                        100 * used / limit, used >> 20, limit >> 20)  # fmt: skip
        self._memory_warned = near

    def on_rejected_sync_events(self, totals: Mapping[str, int]) -> None:
        """Record the running counts of membership events the weight-sync store dropped, by reason."""
        for reason, total in totals.items():
            self.sync_rejected_events.labels(reason).inc(max(0, total - self._rejected_seen.get(reason, 0)))
            self._rejected_seen[reason] = total

    def on_quarantines(self, total: int) -> None:
        """Record the running count of servers the learner quarantined."""
        self.canary_mismatches.inc(max(0, total - self._quarantined_seen))
        self._quarantined_seen = total

    def on_sync(self, report: BroadcastReport) -> None:
        """Record one weight broadcast."""
        self.sync_seconds.observe(report.seconds)
        if report.dropped:
            log.warning("weight sync v%d dropped receivers: %s", report.version, report.dropped)
