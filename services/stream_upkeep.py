"""Keeping long-lived stream loops going: riding out Redis outages, the consumer loop the rollout and reward
workers share, and deleting stream entries every consumer group has acknowledged.

:mod:`services.streams` retries one call a bounded number of times; the code here is for the loops around those
calls, which must outlive a Redis that stays away longer (a restart replaying a large append-only file, a failover,
a partition) and must keep the work streams from growing for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis import exceptions as rexc

from services.streams import TRANSIENT_ERRORS, StreamClient

log = logging.getLogger(__name__)


class OutageBackoff:
    """Pauses of a long-lived loop (a stream worker, the feeder) whose Redis call failed even after its retries.

    One call gives up after ``redis.retries`` attempts, 8 to 16 s with the defaults, but Redis can stay away
    longer: a restart replaying a large append-only file, a failover, a partition. A loop that must outlive that
    catches :data:`TRANSIENT_ERRORS` around one iteration, awaits :meth:`pause` (capped exponential backoff with
    jitter, cut short by ``stop``) and tries again; :meth:`reset` after an iteration that succeeded. Whatever the
    failed iteration had read stays pending in Redis and is claimed again after the visibility timeout.
    """

    def __init__(self, what: str, cap_s: float = 5.0, base_s: float = 0.5) -> None:
        self.what = what
        self.cap_s = cap_s
        self.base_s = base_s
        self.failures = 0
        self._since = 0.0

    async def pause(self, exc: BaseException, stop: asyncio.Event | None = None) -> None:
        """Log the failure and wait before the next try (returns early once ``stop`` is set)."""
        if self.failures == 0:
            self._since = time.monotonic()
        self.failures += 1
        delay = min(self.cap_s, self.base_s * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0)
        log.warning(
            "%s: Redis unreachable for %.0fs (%s: %s); trying again in %.1fs",
            self.what, time.monotonic() - self._since, type(exc).__name__, exc, delay,
        )  # fmt: skip
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    def reset(self) -> None:
        """Record a successful iteration (logs the end of an outage)."""
        if self.failures:
            log.warning("%s: Redis reachable again after %.0fs", self.what, time.monotonic() - self._since)
        self.failures = 0


async def consume(
    what: str,
    client: StreamClient,
    step: Callable[[bool], Awaitable[object]],
    stop: asyncio.Event,
    *,
    claim_every_s: float,
    backoff_max_s: float,
) -> None:
    """Run ``step(claim)`` until ``stop`` is set: the loop of a stream worker.

    ``claim`` is True every ``claim_every_s`` seconds (time to claim entries a dead consumer left pending). The
    consumer group is created on the first iteration that reaches Redis. An iteration that fails on a transient
    Redis error pauses with :class:`OutageBackoff` instead of ending the loop.
    """
    outage = OutageBackoff(what, backoff_max_s)
    next_claim = 0.0
    group_ready = False
    while not stop.is_set():
        claim = time.monotonic() >= next_claim
        if claim:
            next_claim = time.monotonic() + claim_every_s
        try:
            if not group_ready:
                await client.ensure_group()
                group_ready = True
            await step(claim)
        except TRANSIENT_ERRORS as exc:
            await outage.pause(exc, stop)
        else:
            outage.reset()


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def trim_acknowledged(redis: aioredis.Redis, key: str, retain_s: float) -> int:
    """Delete the entries of stream ``key`` that every consumer group has acknowledged and that are older than
    ``retain_s`` seconds (by Redis's clock: entry ids are millisecond timestamps); returns how many went.

    The trim point is the oldest id some group still needs: its oldest pending entry, or the entry after the
    last one it was delivered. ``XTRIM MINID`` removes only ids below it, so an undelivered or unacknowledged entry
    is never removed, and a stream without consumer groups is never trimmed. The trim is approximate (``~``):
    Redis removes whole internal nodes only, so a few acknowledged entries may stay until the next call.
    """
    try:
        groups = await redis.xinfo_groups(key)
    except rexc.ResponseError:  # no such stream
        return 0
    if not groups:
        return 0
    seconds, micros = await redis.time()
    point = (int(seconds) * 1000 + int(micros) // 1000 - int(retain_s * 1000), 0)
    for group in groups:
        last = _id_tuple(group["last-delivered-id"])
        needed = (last[0], last[1] + 1)
        if int(group.get("pending") or 0) > 0:
            summary = await redis.xpending(key, group["name"])
            if summary.get("min") is not None:
                needed = min(needed, _id_tuple(summary["min"]))
        point = min(point, needed)
    if point <= (0, 0):
        return 0
    removed: int = await redis.xtrim(key, minid=f"{point[0]}-{point[1]}", approximate=True)
    return removed


async def trim_dead_letters(redis: aioredis.Redis, key: str, max_entries: int, retain_s: float) -> int:
    """Keep the dead-letter stream bounded: about the newest ``max_entries`` letters, none older than ``retain_s``.

    Nobody consumes dead letters (people read them, reports count them), so both bounds are plain, exact trims (the
    stream is small; exactness keeps the bound a promise).
    """
    cutoff_ms = max(0, int((time.time() - retain_s) * 1000))
    removed: int = await redis.xtrim(key, minid=f"{cutoff_ms}-0", approximate=False)
    removed += await redis.xtrim(key, maxlen=max_entries, approximate=False)
    return removed


async def remove_dead_consumers(redis: aioredis.Redis, key: str, group: str, idle_s: float) -> list[str]:
    """Delete the consumers of ``group`` on ``key`` that hold nothing pending and were idle for ``idle_s``.

    A consumer that was killed stays in its group for ever otherwise (its pending entries are claimed by the others
    after the visibility timeout, so it ends with none). A live one reads every ``streams.block_ms`` and is never
    that idle; were one deleted anyway, its next read recreates it. Returns the names removed.
    """
    try:
        consumers = await redis.xinfo_consumers(key, group)
    except rexc.ResponseError:  # no such stream or group yet
        return []
    removed = []
    for row in consumers:
        name = _text(row.get("name"))
        if int(row.get("pending", 0)) == 0 and int(row.get("idle", 0)) >= idle_s * 1000:
            await redis.xgroup_delconsumer(key, group, name)
            removed.append(name)
    return removed


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
