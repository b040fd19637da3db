"""The learner's Prometheus metrics (``dipo_learner_*``) and its small HTTP endpoint (``/health``, ``/metrics``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from redis.exceptions import RedisError

from learner.batch import StepBatch
from learner.weight_sync import BroadcastReport
from services.config import RunConfig
from services.http import bind_socket
from services.metrics import ComponentMetrics, metrics_asgi_app
from services.streams import run_key

if TYPE_CHECKING:
    from learner.loop import Learner

log = logging.getLogger(__name__)

_STREAM_GROUPS = {"prompts": "rollout", "rollouts": "reward", "scored": "learner", "deadletter": None}
_GAUGES = {  # metrics.jsonl key -> (metric, labels)
    "reward_mean": ("reward_mean", {}),
    "accuracy": ("accuracy", {}),
    "tau": ("tau", {}),
    "gate_open_ratio": ("gate_open_ratio", {}),
    "entropy": ("entropy", {}),
    "kl_behaviour": ("kl_behaviour", {}),
    "loss": ("loss", {}),
    "grad_norm": ("grad_norm", {}),
    "lr": ("learning_rate", {}),
}


class LearnerMetrics:
    """Every learner metric, on its own registry, served with ``/health`` on the learner's HTTP port."""

    def __init__(self, cfg: RunConfig, learner: Learner | None = None) -> None:
        m = ComponentMetrics("learner")
        self.component = m
        self.learner = learner
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
        self.released = m.counter("prompts_released", "Prompts released by the feeder.")
        self.step_seconds = m.histogram("step_seconds", "Wall time of one optimizer step.")
        self.wait_seconds = m.histogram("wait_seconds", "Time waiting for scored groups per step.")
        self.sync_seconds = m.histogram("weight_sync_seconds", "Broadcast time of one weight update.")
        self.checkpoint_seconds = m.histogram("checkpoint_seconds", "Time to write one checkpoint.")
        self.stream_length = m.gauge("stream_length", "Entries in a stream of the run.", ["stream"])
        self.stream_pending = m.gauge("stream_pending", "Pending entries of the stream's consumer group.", ["stream"])
        self._last_dropped: dict[str, int] = {}
        self._released_seen = 0
        self.started = time.time()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = self._serve(cfg)

    def on_step(self, line: dict[str, Any], batch: StepBatch) -> None:
        """Update every metric from one metrics.jsonl line."""

        def num(key: str) -> float:
            value = line.get(key)
            return float(value) if isinstance(value, int | float) else float("nan")

        for key, gauge in self.gauges.items():
            gauge.set(num(key))
        self.step.set(line["step"])
        self.version.set(line["version"])
        for kind in ("easy", "normal", "hard"):
            self.kind_share.labels(kind).set(num(f"kind_{kind}"))
        for action in ("reward", "penalty"):
            self.reallocations.labels(action).inc(num(f"realloc_{action}") or 0)
        self.ppl.labels("1").set(num("ppl_correct"))
        self.ppl.labels("0").set(num("ppl_wrong"))
        self.clip.labels("low").set(num("clip_low"))
        self.clip.labels("high").set(num("clip_high"))
        self.iw.labels("mean").set(num("is_weight_mean"))
        self.iw.labels("max").set(num("is_weight_max"))
        self.staleness.labels("mean").set(num("staleness_mean"))
        self.staleness.labels("max").set(num("staleness_max"))
        for reason in ("stale", "no_signal", "duplicate"):  # metrics.jsonl holds running totals
            total = int(line.get(f"dropped_{reason}") or 0)
            self.dropped.labels(reason).inc(max(0, total - self._last_dropped.get(reason, 0)))
            self._last_dropped[reason] = total
        self.used.inc(len(batch.used))
        released = int(line.get("prompts_released") or 0)
        self.released.inc(max(0, released - self._released_seen))
        self._released_seen = released
        self.step_seconds.observe(num("step_seconds") if line.get("step_seconds") else 0.0)
        self.wait_seconds.observe(num("wait_seconds"))
        if line.get("checkpoint_seconds"):
            self.checkpoint_seconds.observe(num("checkpoint_seconds"))

    async def observe_streams(self, redis: aioredis.Redis, run: str) -> None:
        """Record each stream's length and its consumer group's pending count (best effort: a metric, not control)."""
        for name, group in _STREAM_GROUPS.items():
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

    def on_sync(self, report: BroadcastReport) -> None:
        """Record one weight broadcast."""
        self.sync_seconds.observe(report.seconds)
        if report.dropped:
            log.warning("weight sync v%d dropped receivers: %s", report.version, report.dropped)

    def _serve(self, cfg: RunConfig) -> int:
        app = FastAPI(title="dipo learner", version="1")
        app.mount("/metrics", metrics_asgi_app(self.component))

        @app.get("/health")
        def health() -> dict[str, Any]:
            """The learner is up; step and version tell whether it progresses."""
            learner = self.learner
            return {"ok": True, "component": "learner", "step": learner.step if learner else 0,
                    "version": learner.version if learner else 0, "uptime_s": time.time() - self.started}  # fmt: skip

        sock = bind_socket(cfg.learner.server.host, cfg.learner.server.port)
        port = int(sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the loop owns signals
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="learner-http")  # fmt: skip
        self._thread.start()
        log.info("learner metrics on http://%s:%d/metrics", cfg.learner.server.host, port)
        return port

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
