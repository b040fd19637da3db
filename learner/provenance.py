"""Weight provenance on the learner's side: record what each version's weights are, and check every group against it.

For each version it publishes the learner records the fingerprint of its weights (``weights`` hash) and its own
scoring of the canary (``canaries`` hash, ``ref:{v}``). Before a scored group is used, every span of its responses
must come from weights the learner published: the span's fingerprint, when the server knows one, must be the
learner's for that version, and the server's canary for the version must agree with the learner's within
``rollout.canary_tolerance``. A group that fails goes to the dead-letter stream with the reason, and a server whose
canary disagrees is quarantined: it reloads the newest checkpoint (rollout_server/sync.py). docs/WEIGHT_SYNC.md,
"Provenance".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import redis.asyncio as aioredis

from services.canary import (
    CanaryScore,
    canary_distance,
    decode_scorings,
    encode_scorings,
    reference_field,
    scorings_during,
    server_field,
)
from services.config import RunConfig
from services.contracts import CANARIES, QUARANTINE, WEIGHTS
from services.protocol import ProtocolError, RolloutGroup
from services.streams import call_with_retries, run_key

log = logging.getLogger(__name__)

T = TypeVar("T")
VERDICTS_KEPT = 4096


class Provenance:
    """Publishes the learner's record of each version and judges the weights behind each group."""

    def __init__(self, cfg: RunConfig, redis: aioredis.Redis) -> None:
        self.cfg = cfg
        self.redis = redis
        self.tolerance = cfg.rollout.canary_tolerance
        self.weights_key = run_key(cfg.name, WEIGHTS)
        self.canaries_key = run_key(cfg.name, CANARIES)
        self.quarantine_key = run_key(cfg.name, QUARANTINE)
        self._references: dict[int, CanaryScore | None] = {}
        self._verdicts: dict[tuple[str, int, bytes], str | None] = {}
        self._recording: dict[int, asyncio.Event] = {}
        self.rejected = 0
        self.quarantined = 0

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        rc = self.cfg.redis
        return await call_with_retries(op, fn, timeout_s=rc.socket_timeout_s, retries=rc.retries,
                                       backoff_base_s=rc.backoff_base_s, backoff_cap_s=rc.backoff_max_s)  # fmt: skip

    # ------------------------------------------------------------------ the learner's record

    def expect(self, version: int) -> None:
        """A publication of ``version`` has begun: groups of it are judged only once it is recorded."""
        self._recording.setdefault(version, asyncio.Event())

    def settled(self, version: int) -> None:
        """The publication of ``version`` ended (recorded, or failed: then its groups find no record)."""
        event = self._recording.pop(version, None)
        if event is not None:
            event.set()

    async def record(self, reference: CanaryScore) -> None:
        """Publish version ``reference.version``'s fingerprint and the learner's canary scoring of it."""
        self._references[reference.version] = reference

        async def op() -> list[object]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.weights_key, str(reference.version), reference.weights)
                pipe.hset(self.canaries_key, reference_field(reference.version), encode_scorings([reference]))
                result: list[object] = await pipe.execute()
                return result

        await self._call(f"HSET {self.weights_key}", op)

    async def forget_before(self, version: int, keep: set[int]) -> int:
        """Delete the record (and servers' canaries) of versions below ``version`` except ``keep``; returns fields."""
        doomed_weights = [k for k in await self._call("HKEYS weights", lambda: self.redis.hkeys(self.weights_key))
                          if _version_of(k) < version and _version_of(k) not in keep]  # fmt: skip
        fields = await self._call("HKEYS canaries", lambda: self.redis.hkeys(self.canaries_key))
        doomed_canaries = [f for f in fields if _version_of(f) < version and _version_of(f) not in keep]
        for key, doomed in ((self.weights_key, doomed_weights), (self.canaries_key, doomed_canaries)):
            if doomed:
                await self._call(f"HDEL {key}", lambda k=key, d=doomed: self.redis.hdel(k, *d))  # type: ignore[misc]
        for old in [v for v in self._references if v < version and v not in keep]:
            del self._references[old]
        return len(doomed_weights) + len(doomed_canaries)

    # ------------------------------------------------------------------ judging groups

    async def check(self, rollout: RolloutGroup) -> str | None:
        """Why the group's weights are not the learner's (None when every span checks out)."""
        server = rollout.worker_id
        spans = {(int(v), w) for r in rollout.responses for v, w in zip(r.span_versions, r.span_weights, strict=True)}
        window = (rollout.generated_at - rollout.gen_seconds, rollout.generated_at)
        for version, fingerprint in sorted(spans):
            recording = self._recording.get(version)
            if recording is not None:  # its servers were faster than the learner's own record: wait for it
                await recording.wait()
            published = await self._published(version)
            if fingerprint and published and fingerprint != published:
                return f"v{version}: {server} sampled with weights {fingerprint}, the learner published {published}"
            problem = await self._judge_canary(server, version, window)
            if problem is not None:
                return problem
        return None

    async def _published(self, version: int) -> str | None:
        raw = await self._call("HGET weights", lambda: self.redis.hget(self.weights_key, str(version)))
        return _text(raw) if raw is not None else None

    async def _judge_canary(self, server: str, version: int, window: tuple[float, float]) -> str | None:
        """Judge the server's scorings of ``version`` that were in force while it generated the group."""
        field = server_field(server, version)
        blob = await self._call("HGET canary", lambda: self.redis.hget(self.canaries_key, field))
        if blob is None:
            return f"v{version}: {server} published no canary for the weights it sampled with"
        try:
            scorings = scorings_during(decode_scorings(blob), *window)
        except ProtocolError as exc:
            return f"v{version}: {server}'s canary is malformed ({exc})"
        for scoring in scorings:
            key = (server, version, scoring.digest)
            if key not in self._verdicts:
                self._verdicts[key] = await self._compare(server, version, scoring)
                while len(self._verdicts) > VERDICTS_KEPT:
                    self._verdicts.pop(next(iter(self._verdicts)))
            if self._verdicts[key] is not None:
                return self._verdicts[key]
        return None

    async def _compare(self, server: str, version: int, theirs: CanaryScore) -> str | None:
        reference = await self._reference(version)
        if reference is None:
            return f"v{version}: the learner has no canary of this version (it never published it)"
        distance = canary_distance(reference.logprobs, theirs.logprobs)
        if distance <= self.tolerance:
            return None
        await self._quarantine(server, version)
        return (f"canary mismatch: {server}'s weights for v{version} score the canary {distance:.4g} nats/token "
                f"away from the learner's (tolerance {self.tolerance:g})")  # fmt: skip

    async def _reference(self, version: int) -> CanaryScore | None:
        if version not in self._references:
            field = reference_field(version)
            raw = await self._call("HGET canary ref", lambda: self.redis.hget(self.canaries_key, field))
            try:
                self._references[version] = decode_scorings(raw)[-1] if raw is not None else None
            except ProtocolError:
                self._references[version] = None
        return self._references[version]

    async def _quarantine(self, server: str, version: int) -> None:
        self.quarantined += 1
        log.error("quarantining %s: its canary of v%d disagrees with the learner's; it reloads a checkpoint",
                  server, version)  # fmt: skip
        await self._call("HSET quarantine", lambda: self.redis.hset(self.quarantine_key, server, str(version)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _version_of(field: bytes | str) -> int:
    """The version a weights/canaries field is about (``12``, ``ref:12``, ``rollout-host-1:12``)."""
    tail = _text(field).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def canary_reference(version: int, fingerprint: str, logprobs: np.ndarray) -> CanaryScore:
    """The learner's record of one version."""
    return CanaryScore(version, fingerprint, np.asarray(logprobs, dtype=np.float32), time.time())
