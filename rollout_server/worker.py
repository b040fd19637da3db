"""The rollout stream worker: ``prompts`` -> generate n responses per prompt -> ``rollouts``.

Each server reads ``prompts`` through the consumer group ``rollout``, up to ``rollout.prompts_per_batch`` tasks at a
time, generates every task's group while holding the weights for the whole batch (so all its responses come from one
policy version), then writes the groups and acknowledges their prompts in one Redis transaction. A prompt is thus
either still pending (and claimed by a live server after the visibility timeout) or answered. Tasks the backend
refuses (a prompt longer than the model's context, an empty stop string, a group larger than ``MAX_GROUP_SIZE``) go
to ``deadletter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import redis.asyncio as aioredis

from rollout_server.backends.base import Backend, PromptGroup
from rollout_server.metrics import RolloutMetrics
from rollout_server.sync import PolicyWeights
from services.config import RunConfig
from services.contracts import POLICY, PROMPTS, ROLLOUT_GROUP, ROLLOUTS, PolicyField, consumer_name
from services.protocol import PromptTask, ProtocolError, Response, RolloutGroup, Sampling
from services.stream_upkeep import consume
from services.streams import DATA_FIELD, Entry, RecentIds, StreamClient, StreamSpec, call_with_retries, run_key

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_GROUP_SIZE = 1024
"""Largest ``n`` a task may ask for (``sampling.n``'s own cap): a bigger one is refused, never allocated."""


async def run_in_daemon_thread(fn: Callable[[], T]) -> T:
    """Await ``fn()`` run on a daemon thread.

    Unlike ``asyncio.to_thread``, a call abandoned at shutdown cannot keep the process alive: the default executor's
    threads are joined at exit, which would make a SIGTERM wait for the whole batch after all.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the event loop closed while we ran
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="rollout-generate", daemon=True).start()
    return await future


@dataclass
class BatchResult:
    """What one generation batch produced: a group or an error per task, and totals for the metrics."""

    groups: list[RolloutGroup | None]
    errors: list[str | None]
    tokens: int
    seconds: float
    version: int


class RolloutWorker:
    """One rollout server's stream loop."""

    def __init__(
        self,
        cfg: RunConfig,
        backend: Backend,
        redis: aioredis.Redis,
        metrics: RolloutMetrics | None = None,
        consumer: str | None = None,
        *,
        weights: PolicyWeights | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.redis = redis
        self.metrics = metrics or RolloutMetrics()
        self.consumer = consumer or consumer_name("rollout")
        self.weights = weights or PolicyWeights(backend)
        self.prompts = StreamClient.from_config(redis, cfg, PROMPTS, ROLLOUT_GROUP, self.consumer)
        self.rollouts_spec = StreamSpec(cfg.name, ROLLOUTS)
        self.policy_key = run_key(cfg.name, POLICY)
        self._done = RecentIds()  # (prompt_id, dispatch_version) answered here: drop at-least-once duplicates
        self.groups_done = 0

    # ------------------------------------------------------------------ generation (runs on a worker thread)

    def generate_batch(self, tasks: Sequence[PromptTask]) -> BatchResult:
        """Generate every task's group while holding the weights, one backend call per distinct sampling setup."""
        groups: list[RolloutGroup | None] = [None] * len(tasks)
        errors: list[str | None] = [None] * len(tasks)
        by_key: dict[tuple[int, Sampling], list[int]] = {}
        for i, task in enumerate(tasks):
            if task.n > MAX_GROUP_SIZE:  # decodes fine, but the backend would allocate n rows of KV cache
                errors[i] = f"generation refused the task: n={task.n} exceeds the largest group ({MAX_GROUP_SIZE})"
                continue
            by_key.setdefault((task.n, task.sampling), []).append(i)
        start = time.perf_counter()
        with self.weights.batch() as version:
            for indices in by_key.values():
                self._generate_alike(tasks, indices, version, groups, errors)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for g in groups if g is not None for r in g.responses)
        return BatchResult(groups, errors, tokens, seconds, version)

    def _generate_alike(
        self,
        tasks: Sequence[PromptTask],
        indices: list[int],
        version: int,
        groups: list[RolloutGroup | None],
        errors: list[str | None],
    ) -> None:
        """Generate tasks that share n and sampling in one call; on a refused input, retry them one at a time."""
        first = tasks[indices[0]]
        start = time.perf_counter()
        try:
            outputs = self.backend.generate([tasks[i].messages for i in indices], first.n, first.sampling)
        except ValueError as exc:
            if len(indices) == 1:
                errors[indices[0]] = f"generation refused the task: {exc}"
                return
            for i in indices:  # find the one the backend refuses without losing the others
                self._generate_alike(tasks, [i], version, groups, errors)
            return
        seconds = time.perf_counter() - start
        for i, output in zip(indices, outputs, strict=True):
            groups[i] = self._group(tasks[i], output, version, seconds)

    def _group(self, task: PromptTask, output: PromptGroup, version: int, seconds: float) -> RolloutGroup:
        # Weights only change between batches, so the first and last token of every response share one version.
        responses = [
            Response(
                token_ids=np.asarray(c.token_ids, dtype="<u4"),
                logprobs=np.asarray(c.logprobs, dtype="<f4"),
                text=c.text,
                finish_reason=c.finish_reason,
                version_first=version,
                version_last=version,
            )
            for c in output.completions
        ]
        return RolloutGroup(
            task=task,
            prompt_token_ids=np.asarray(output.prompt_token_ids, dtype="<u4"),
            responses=responses,
            worker_id=self.consumer,
            generated_at=time.time(),
            gen_seconds=seconds,
        )

    # ------------------------------------------------------------------ the stream loop

    def _decode(self, data: bytes) -> PromptTask:
        return PromptTask.from_bytes(data, max_bytes=self.cfg.streams.max_payload_bytes)

    async def _read(self, claim: bool) -> list[tuple[str, PromptTask]]:
        streams, count = self.cfg.streams, self.cfg.rollout.prompts_per_batch
        batch: list[tuple[str, PromptTask]] = []
        if claim:
            batch = await self.prompts.claim_decoded(self._decode, int(streams.visibility_timeout_s * 1000), count)
            if batch:
                log.info("claimed %d prompts idle for over %.0fs", len(batch), streams.visibility_timeout_s)
        if not batch:
            batch = await self.prompts.read_decoded(self._decode, count, streams.block_ms)
        return batch

    async def step(self, *, claim: bool) -> int:
        """One read (or claim), generation and write; returns the number of groups produced."""
        batch = await self._read(claim)
        fresh: list[tuple[str, PromptTask]] = []
        duplicates: list[str] = []
        keys: set[str] = set()
        for entry_id, task in batch:
            key = f"{task.prompt_id}@{task.dispatch_version}"
            if key in self._done or key in keys:
                duplicates.append(entry_id)
            else:
                keys.add(key)
                fresh.append((entry_id, task))
        if duplicates:
            await self.prompts.ack(duplicates)
        if not fresh:
            return 0
        now = time.time()
        for _, task in fresh:
            self.metrics.queue_wait.observe(max(0.0, now - task.created_at))
        self.metrics.batch_size.set(len(fresh))
        tasks = [task for _, task in fresh]
        try:
            result = await run_in_daemon_thread(lambda: self.generate_batch(tasks))
        except asyncio.CancelledError:
            # Shutdown outran the grace period: the prompts stay pending and a live server claims them.
            self.metrics.abandoned.inc(len(fresh))
            log.warning("abandoned a batch of %d prompts on shutdown; they stay pending", len(fresh))
            raise
        return await self._write(fresh, result)

    async def _write(self, batch: list[tuple[str, PromptTask]], result: BatchResult) -> int:
        produced: list[tuple[StreamSpec, bytes]] = []
        acked: list[str] = []
        refused: list[tuple[Entry, str]] = []
        for (entry_id, task), group, error in zip(batch, result.groups, result.errors, strict=True):
            try:
                if group is None:
                    raise ValueError(error or "no group generated")
                produced.append((self.rollouts_spec, group.to_bytes()))
                acked.append(entry_id)
            except (ValueError, ProtocolError) as exc:  # ProtocolError is a ValueError; named for the reader
                refused.append((Entry(entry_id, {DATA_FIELD: task.to_bytes()}), str(exc)))
        if acked:
            await self.prompts.ack(acked, produce=produced)  # the groups and the acks in one MULTI
        if refused:
            await self.prompts.dead_letter(refused)
        for entry_id, task in batch:
            if entry_id in acked:
                self._done.add(f"{task.prompt_id}@{task.dispatch_version}")
        self.groups_done += len(acked)
        m = self.metrics
        m.groups.inc(len(acked))
        m.tokens.inc(result.tokens)
        m.generate_seconds.observe(result.seconds)
        m.tokens_per_second.set(result.tokens / result.seconds if result.seconds > 0 else 0.0)
        await self._observe_lag(result.version)
        return len(acked)

    async def _observe_lag(self, version: int) -> None:
        rc = self.cfg.redis
        raw = await call_with_retries(
            f"HGET {self.policy_key}",
            lambda: self.redis.hget(self.policy_key, PolicyField.VERSION),
            timeout_s=rc.socket_timeout_s,
            retries=rc.retries,
            backoff_base_s=rc.backoff_base_s,
            backoff_cap_s=rc.backoff_max_s,
        )
        if raw is not None:
            self.metrics.version_lag.set(int(raw) - version)

    async def run(self, stop: asyncio.Event) -> None:
        """Generate until ``stop`` is set; the batch in progress is finished first (the caller bounds that wait).

        A Redis outage longer than one call's retries pauses the loop (capped backoff) instead of ending it; a
        batch whose write failed stays pending and is claimed again after the visibility timeout.
        """
        log.info("rollout worker %s consuming %s", self.consumer, self.prompts.key)
        await consume(
            f"rollout worker {self.consumer}",
            self.prompts,
            lambda claim: self.step(claim=claim),
            stop,
            claim_every_s=max(1.0, self.cfg.streams.visibility_timeout_s / 4),
            backoff_max_s=self.cfg.redis.backoff_max_s,
        )
        log.info("rollout worker %s stopped after %d groups", self.consumer, self.groups_done)
