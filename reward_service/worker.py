"""The reward stream worker: ``rollouts`` -> verify -> DiPO -> ``scored``.

Each replica reads ``rollouts`` through the consumer group ``reward``, scores every group, and writes the scored
group and acknowledges the rollout entry in one Redis transaction, so a group is either still pending (and will be
claimed by a live replica after the visibility timeout) or scored exactly once. Malformed entries go to
``deadletter``; so do entries that keep failing (delivery limit).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

import numpy as np
import redis.asyncio as aioredis

from reward_service.metrics import RewardMetrics
from reward_service.scoring import FitStamp, score_group
from reward_service.verifiers.base import VerifyResult
from reward_service.verify import Verifiers
from reward_service.window import PplWindow
from services.config import RunConfig
from services.contracts import REWARD_GROUP, ROLLOUTS, SCORED, consumer_name
from services.protocol import RolloutGroup, ScoredGroup
from services.stream_upkeep import consume
from services.streams import DATA_FIELD, Entry, StreamClient, StreamSpec

log = logging.getLogger(__name__)

_FAILURE_WINDOW = 1000  # verifications the failure rate is measured over


class RewardWorker:
    """One reward replica's stream loop (the HTTP app scores through :meth:`score` too)."""

    def __init__(
        self,
        cfg: RunConfig,
        redis: aioredis.Redis,
        verifiers: Verifiers,
        metrics: RewardMetrics | None = None,
        consumer: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.redis = redis
        self.verifiers = verifiers
        self.metrics = metrics or RewardMetrics()
        self.consumer = consumer or consumer_name("reward")
        self.rollouts = StreamClient.from_config(redis, cfg, ROLLOUTS, REWARD_GROUP, self.consumer)
        self.scored_spec = StreamSpec(cfg.name, SCORED)
        self._windows: dict[str, PplWindow] = {}
        self._recent_failures: collections.deque[bool] = collections.deque(maxlen=_FAILURE_WINDOW)
        self._warned_at = 0.0
        self.groups_done = 0

    # ------------------------------------------------------------------ scoring (shared with the HTTP app)

    def window(self, task_kind: str) -> PplWindow:
        """The shared PPL window of one task kind."""
        if task_kind not in self._windows:
            dipo = self.cfg.reward.dipo
            self._windows[task_kind] = PplWindow(
                self.redis,
                self.cfg.name,
                task_kind,
                capacity=self.cfg.window_size,
                min_window=self.cfg.min_window,
                refit_every_items=dipo.refit_every_items,
                refit_every_s=dipo.refit_every_s,
                retries=self.cfg.redis.retries,
                timeout_s=self.cfg.redis.socket_timeout_s,
            )
        return self._windows[task_kind]

    async def verify_all(self, group: RolloutGroup) -> list[VerifyResult]:
        kind = group.task.task_kind

        async def one(text: str) -> VerifyResult:
            start = time.perf_counter()
            result = await self.verifiers.verify(group.task, text)
            self.metrics.verify_seconds.labels(kind).observe(time.perf_counter() - start)
            self.metrics.responses.labels(kind, str(result.status)).inc()
            self._recent_failures.append(result.status.is_infrastructure_failure)
            return result

        return list(await asyncio.gather(*(one(r.text) for r in group.responses)))

    async def score(self, group: RolloutGroup, *, update_window: bool = True) -> ScoredGroup:
        """Verify and score one group with the fit in force; optionally add its items to the shared window."""
        results = await self.verify_all(group)
        window = self.window(group.task.task_kind)
        stamp = await window.current()
        scored = score_group(
            group,
            results,
            stamp,
            self.cfg.reward,
            overlong_buffer=self.cfg.reward.overlong.buffer,
            scorer_id=self.consumer,
        )
        self._observe(group.task.task_kind, scored, stamp)
        if update_window:
            await window.append(scored.perplexity, scored.correct.astype(bool))
        return scored

    def _observe(self, kind: str, scored: ScoredGroup, stamp: FitStamp) -> None:
        m = self.metrics
        m.groups.labels(kind, scored.group_kind, scored.action).inc()
        if not scored.signal:
            m.dropped.labels("no_signal").inc()
        m.tau.labels(kind).set(stamp.fit.tau if math.isfinite(stamp.fit.tau) else float("nan"))
        m.gate_open.labels(kind).set(1.0 if stamp.fit.gate_open else 0.0)
        m.window_items.labels(kind).set(stamp.fit.window_size)
        m.window_error_rate.labels(kind).set(stamp.fit.error_rate)
        for p, c in zip(scored.perplexity, scored.correct, strict=True):
            if np.isfinite(p):
                m.ppl.labels("1" if c else "0").observe(float(p))
        rate = sum(self._recent_failures) / max(1, len(self._recent_failures))
        m.failure_rate.set(rate)
        m.worker_restarts.set(self.verifiers.worker_restarts)
        if rate > self.cfg.reward.failure_warn_rate and time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            log.warning(
                "verifier timeouts+errors are %.1f%% of the last %d verifications (warn above %.1f%%)",
                100 * rate, len(self._recent_failures), 100 * self.cfg.reward.failure_warn_rate,
            )  # fmt: skip

    # ------------------------------------------------------------------ the stream loop

    def _decode(self, data: bytes) -> RolloutGroup:
        return RolloutGroup.from_bytes(data, max_bytes=self.cfg.streams.max_payload_bytes)

    async def _process(self, entry_id: str, group: RolloutGroup) -> None:
        start = time.perf_counter()
        try:
            scored = await self.score(group, update_window=False)
        except ValueError as exc:  # a well-formed message whose task no verifier can handle
            entry = Entry(entry_id, {DATA_FIELD: group.to_bytes()})
            await self.rollouts.dead_letter([(entry, f"cannot score: {exc}")])
            self.metrics.dead_lettered.inc()
            return
        await self.rollouts.ack([entry_id], produce=[(self.scored_spec, scored.to_bytes())])
        # After the ack: a crash here loses only window items (the window is a lossy statistic by design).
        await self.window(group.task.task_kind).append(scored.perplexity, scored.correct.astype(bool))
        self.metrics.group_seconds.observe(time.perf_counter() - start)
        self.groups_done += 1

    async def step(self, *, claim: bool) -> int:
        """One read (or claim) and the scoring of what it returned; returns the number of groups processed."""
        streams = self.cfg.streams
        dead_before = self.rollouts.stats.dead_lettered
        batch: list[tuple[str, RolloutGroup]] = []
        if claim:
            batch = await self.rollouts.claim_decoded(
                self._decode, int(streams.visibility_timeout_s * 1000), streams.read_count
            )
            self.metrics.claimed.inc(len(batch))
        if not batch:
            batch = await self.rollouts.read_decoded(self._decode, streams.read_count, streams.block_ms)
        self.metrics.dead_lettered.inc(self.rollouts.stats.dead_lettered - dead_before)
        await asyncio.gather(*(self._process(entry_id, group) for entry_id, group in batch))
        return len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Score groups until ``stop`` is set; the current batch is finished first.

        A Redis outage longer than one call's retries pauses the loop (capped backoff) instead of ending it: the
        HTTP app would otherwise keep answering while nothing consumes the stream.
        """
        log.info("reward worker %s consuming %s", self.consumer, self.rollouts.key)
        await consume(
            f"reward worker {self.consumer}",
            self.rollouts,
            lambda claim: self.step(claim=claim),
            stop,
            claim_every_s=max(1.0, self.cfg.streams.visibility_timeout_s / 4),
            backoff_max_s=self.cfg.redis.backoff_max_s,
        )
        log.info("reward worker %s stopped after %d groups", self.consumer, self.groups_done)
