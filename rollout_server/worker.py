"""The rollout stream worker: ``prompts`` -> generate n responses per prompt -> ``rollouts``, continuously.

Each server reads ``prompts`` through the consumer group ``rollout`` and keeps up to ``rollout.max_inflight_groups``
groups in flight: it takes the next prompt the moment a group finishes, the backend decodes every group in flight
together (continuous batching), and each group is written to ``rollouts`` as soon as its n samples are done, in one
Redis transaction with the acknowledgement of its prompt (and this server's canary scorings of the weights that
sampled it). A prompt is thus either still pending (claimed by a live server after the visibility timeout) or
answered. Tasks the backend refuses (a prompt longer than the model's context, a group larger than the decode
slots or ``MAX_GROUP_SIZE``) go to ``deadletter``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable

import numpy as np
import redis.asyncio as aioredis

from rollout_server.backends.base import Backend, Completion, PromptGroup
from rollout_server.metrics import RolloutMetrics
from rollout_server.policy_weights import PolicyWeights
from services.config import RunConfig
from services.contracts import CANARIES, POLICY, PROMPTS, ROLLOUT_GROUP, ROLLOUTS, PolicyField, consumer_name
from services.protocol import PromptTask, Response, RolloutGroup
from services.stream_upkeep import consume
from services.streams import (
    DATA_FIELD,
    TRANSIENT_ERRORS,
    Entry,
    RecentIds,
    StreamClient,
    StreamSpec,
    call_with_retries,
    run_key,
)

log = logging.getLogger(__name__)

MAX_GROUP_SIZE = 1024
"""Largest ``n`` a task may ask for (``sampling.n``'s own cap): a bigger one is refused, never allocated."""
RATE_WINDOW_S = 30.0
"""Window of the tokens-per-second gauge."""


def to_response(completion: Completion) -> Response:
    """A backend completion as the stream message, with the weight spans that sampled it."""
    return Response(
        token_ids=np.asarray(completion.token_ids, dtype="<u4"),
        logprobs=np.asarray(completion.logprobs, dtype="<f4"),
        text=completion.text,
        finish_reason=completion.finish_reason,
        span_starts=np.asarray([s.start for s in completion.spans], dtype="<u4"),
        span_versions=np.asarray([s.weights.version for s in completion.spans], dtype="<u4"),
        span_weights=[s.weights.fingerprint for s in completion.spans],
    )


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
        self.canaries_key = run_key(cfg.name, CANARIES)
        self._done = RecentIds()  # (prompt_id, dispatch_version) answered here: drop at-least-once duplicates
        self._inflight: dict[str, asyncio.Task[None]] = {}  # key -> the task generating and writing its group
        self._written: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per group
        self.draining = False
        self.groups_done = 0

    @property
    def inflight(self) -> int:
        """Groups taken from the stream and not yet written (or refused)."""
        return len(self._inflight)

    # ------------------------------------------------------------------ the stream loop

    def _decode(self, data: bytes) -> PromptTask:
        return PromptTask.from_bytes(data, max_bytes=self.cfg.streams.max_payload_bytes)

    async def _read(self, claim: bool, count: int) -> list[tuple[str, PromptTask]]:
        streams = self.cfg.streams
        batch: list[tuple[str, PromptTask]] = []
        if claim:
            batch = await self.prompts.claim_decoded(self._decode, int(streams.visibility_timeout_s * 1000), count)
            if batch:
                log.info("claimed %d prompts idle for over %.0fs", len(batch), streams.visibility_timeout_s)
        if not batch:
            batch = await self.prompts.read_decoded(self._decode, count, streams.block_ms)
        return batch

    async def step(self, *, claim: bool) -> int:
        """Take as many prompts as there are free group slots and start generating them; returns how many started.

        With every slot busy it waits (up to ``streams.block_ms``) for a group to finish instead of reading.
        """
        free = self.cfg.rollout.max_inflight_groups - len(self._inflight)
        if free <= 0 or self.draining:
            wait_s = self.cfg.streams.block_ms / 1000
            if self._inflight:
                await asyncio.wait(set(self._inflight.values()), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(wait_s)
            return 0
        started = 0
        duplicates: list[str] = []
        for entry_id, task in await self._read(claim, free):
            key = f"{task.prompt_id}@{task.dispatch_version}"
            if key in self._done or key in self._inflight:
                duplicates.append(entry_id)
                continue
            self.metrics.queue_wait.observe(max(0.0, time.time() - task.created_at))
            self._inflight[key] = asyncio.create_task(self._serve(key, entry_id, task), name=f"group {key}")
            started += 1
        if duplicates:
            await self.prompts.ack(duplicates)
        self._observe_engine()
        return started

    async def _serve(self, key: str, entry_id: str, task: PromptTask) -> None:
        """Generate one group and write it (or dead-letter its prompt); the task ends when either is done."""
        try:
            start = time.perf_counter()
            output = await self._generate(task)
            if isinstance(output, str):
                await self.prompts.dead_letter([(Entry(entry_id, {DATA_FIELD: task.to_bytes()}), output)])
                return
            group = RolloutGroup(task, np.asarray(output.prompt_token_ids, dtype="<u4"),
                                 [to_response(c) for c in output.completions], self.consumer, time.time(),
                                 time.perf_counter() - start)  # fmt: skip
            await self._write(entry_id, group)
            self._done.add(key)
        except asyncio.CancelledError:
            # Shutdown outran the grace period: the prompt stays pending and a live server claims it.
            self.metrics.abandoned.inc()
            raise
        except TRANSIENT_ERRORS as exc:  # Redis stayed away past the retries: the prompt stays pending, reclaimed
            self.metrics.write_failures.inc()
            log.warning("could not write the group of %s (%s: %s); it stays pending", key, type(exc).__name__, exc)
        finally:
            self._inflight.pop(key, None)
            self._observe_engine()

    async def _generate(self, task: PromptTask) -> PromptGroup | str:
        """The task's group, or why the backend refuses it."""
        if task.n > MAX_GROUP_SIZE:  # decodes fine, but the backend would allocate n rows of KV cache
            return f"generation refused the task: n={task.n} exceeds the largest group ({MAX_GROUP_SIZE})"
        future = None
        try:
            prompt_ids = (await asyncio.to_thread(self.backend.encode_prompts, [task.messages]))[0]
            future = self.backend.submit(prompt_ids, task.n, task.sampling)
            return await asyncio.wrap_future(future)
        except ValueError as exc:  # what the wire allows but the model cannot serve
            return f"generation refused the task: {exc}"
        finally:
            if future is not None and not future.done():
                future.cancel()  # cancelled while waiting: the engine frees the group's decode slots

    async def _write(self, entry_id: str, group: RolloutGroup) -> None:
        """The group, its prompt's ack and this server's canaries of the versions that sampled it, atomically."""
        versions = {int(v) for r in group.responses for v in r.span_versions}
        canaries = self.weights.canary_fields(self.consumer, versions)
        await self.prompts.ack([entry_id], produce=[(self.rollouts_spec, group.to_bytes())],
                               hashes={self.canaries_key: canaries})  # fmt: skip
        self.groups_done += 1
        tokens = sum(len(r.token_ids) for r in group.responses)
        m = self.metrics
        m.groups.inc()
        m.tokens.inc(tokens)
        m.generate_seconds.observe(group.gen_seconds)
        m.version_spread.observe(max(r.version_last for r in group.responses) - group.oldest_version)
        self._note_rate(tokens)
        await self._observe_lag(group.oldest_version)

    def _note_rate(self, tokens: int) -> None:
        now = time.monotonic()
        self._written.append((now, tokens))
        while self._written and self._written[0][0] < now - RATE_WINDOW_S:
            self._written.popleft()
        span = max(1.0, now - self._written[0][0]) if len(self._written) > 1 else RATE_WINDOW_S
        self.metrics.tokens_per_second.set(sum(t for _, t in self._written) / span)

    def _observe_engine(self) -> None:
        state = self.backend.state()
        self.metrics.inflight_groups.set(len(self._inflight))
        self.metrics.inflight_tokens.set(state.cached_tokens)
        self.metrics.occupancy.set(state.rows / state.max_rows if state.max_rows else 0.0)

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
        """Generate until ``stop`` is set; the caller bounds how long the groups in flight get to finish.

        A Redis outage longer than one call's retries pauses the loop (capped backoff) instead of ending it; a
        group whose write failed stays pending and is claimed again after the visibility timeout.
        """
        log.info("rollout worker %s consuming %s", self.consumer, self.prompts.key)
        try:
            await consume(
                f"rollout worker {self.consumer}",
                self.prompts,
                lambda claim: self.step(claim=claim),
                stop,
                claim_every_s=max(1.0, self.cfg.streams.visibility_timeout_s / 4),
                backoff_max_s=self.cfg.redis.backoff_max_s,
            )
            await self._finish(self._inflight.values())
        finally:
            await self._cancel(list(self._inflight.values()))
        log.info("rollout worker %s stopped after %d groups", self.consumer, self.groups_done)

    @staticmethod
    async def _finish(tasks: Iterable[asyncio.Task[None]]) -> None:
        pending = list(tasks)
        if pending:
            await asyncio.wait(pending)

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
