"""The shared PPL window (DIPO_SPEC section 2) and the threshold fit in force, both kept in Redis.

Every reward replica appends its scored responses' (perplexity, correctness) pairs to one capped stream per task
kind and reads the fit from one hash per task kind, so all replicas apply the same tau* to the groups they score.
A refit happens when at least ``refit_every_items`` new items arrived since the fit in force, or when it is older
than ``refit_every_s``; one replica does it (a short Redis lock), the others keep using the fit in force.

Keys, under ``dipo:{run}:``: ``ppl_window.{kind}`` (stream, exact MAXLEN K), ``ppl_count.{kind}`` (items ever
appended), ``ppl_fit.{kind}`` (hash: the fit, the count it saw, when), ``ppl_fit_lock.{kind}`` (refit lock).

A group is scored with the fit in force when it arrives, and its own items enter the window afterwards: the window
holds the most recent K scored responses, as the paper's queue holds the last batches.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import numpy as np
import redis.asyncio as aioredis

from reward_service.dipo import ThresholdFit, fit_threshold
from reward_service.scoring import CLOSED_FIT, FitStamp
from services.streams import call_with_retries, run_key

T = TypeVar("T")

# Delete the lock only while it still holds our token (Redis runs the script atomically).
_UNLOCK_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# A refit takes milliseconds; a replica that dies holding the lock blocks the others' refits only this long.
_LOCK_TTL_MS = 2000
_FIT_FIELDS = ("tau", "error_rate", "exploit_correct_share", "explore_wrong_share", "gate_open", "window_size")


class PplWindow:
    """One task kind's shared window of (perplexity, correctness) pairs and its threshold fit."""

    def __init__(
        self,
        redis: aioredis.Redis,
        run: str,
        task_kind: str,
        *,
        capacity: int,
        min_window: int,
        refit_every_items: int,
        refit_every_s: float,
        retries: int = 8,
        timeout_s: float = 10.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"PPL window capacity must be >= 1, got {capacity}")
        self.redis = redis
        self.capacity = capacity
        self.min_window = min_window
        self.refit_every_items = refit_every_items
        self.refit_every_s = refit_every_s
        self.retries = retries
        self.timeout_s = timeout_s
        self.window_key = run_key(run, f"ppl_window.{task_kind}")
        self.count_key = run_key(run, f"ppl_count.{task_kind}")
        self.fit_key = run_key(run, f"ppl_fit.{task_kind}")
        self.lock_key = run_key(run, f"ppl_fit_lock.{task_kind}")
        self._token = uuid.uuid4().hex
        self._unlock = redis.register_script(_UNLOCK_LUA)
        self.refits = 0

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retries(op, fn, timeout_s=self.timeout_s, retries=self.retries)

    async def append(self, ppl: np.ndarray, correct: np.ndarray) -> int:
        """Append the finite-perplexity items of one group; returns how many went in."""
        items = [(float(p), int(bool(c))) for p, c in zip(ppl, correct, strict=True) if math.isfinite(float(p))]
        if not items:
            return 0

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                for p, c in items:
                    pipe.xadd(self.window_key, {"p": repr(p), "c": str(c)}, maxlen=self.capacity, approximate=False)
                pipe.incrby(self.count_key, len(items))
                return await pipe.execute()

        await self._call("PPL append", op)
        return len(items)

    async def read(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The window's (perplexity, correctness) arrays, oldest first, and the append count they reflect."""

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xrevrange(self.window_key, "+", "-", count=self.capacity)
                pipe.get(self.count_key)
                return await pipe.execute()

        entries, count = await self._call("PPL read", op)
        ppl = np.array([float(fields[b"p"]) for _, fields in reversed(entries)], dtype=np.float64)
        correct = np.array([fields[b"c"] == b"1" for _, fields in reversed(entries)], dtype=bool)
        return ppl, correct, int(count or 0)

    async def _stored_fit(self) -> tuple[FitStamp, int] | None:
        raw = await self._call(
            "PPL fit read", lambda: cast(Awaitable[dict[bytes, bytes]], self.redis.hgetall(self.fit_key))
        )
        if not raw:
            return None
        data = {k.decode(): v.decode() for k, v in raw.items()}
        fit = ThresholdFit(
            tau=float(data["tau"]),
            error_rate=float(data["error_rate"]),
            exploit_correct_share=float(data["exploit_correct_share"]),
            explore_wrong_share=float(data["explore_wrong_share"]),
            gate_open=data["gate_open"] == "1",
            window_size=int(data["window_size"]),
        )
        return FitStamp(fit, float(data["fitted_at"])), int(data["count"])

    async def refit(self) -> FitStamp:
        """Fit tau* on the current window and publish it as the fit in force."""
        ppl, correct, count = await self.read()
        fit = fit_threshold(ppl, correct, min_window=self.min_window)
        now = time.time()
        mapping = {name: repr(float(getattr(fit, name))) for name in _FIT_FIELDS[:4]}
        mapping |= {"gate_open": "1" if fit.gate_open else "0", "window_size": str(fit.window_size)}
        mapping |= {"count": str(count), "fitted_at": repr(now)}
        await self._call("PPL fit write", lambda: cast(Awaitable[int], self.redis.hset(self.fit_key, mapping=mapping)))
        self.refits += 1
        return FitStamp(fit, now)

    async def current(self) -> FitStamp:
        """The fit in force, refitting first when it is due and no other replica is already refitting."""
        stored = await self._stored_fit()
        count = int(
            await self._call("PPL count", lambda: cast(Awaitable[bytes | None], self.redis.get(self.count_key))) or 0
        )
        due = (
            stored is None
            or count - stored[1] >= self.refit_every_items
            or time.time() - stored[0].fitted_at >= self.refit_every_s
        )
        if not due:
            assert stored is not None
            return stored[0]
        won = await self._call(
            "PPL lock",
            lambda: self.redis.set(self.lock_key, self._token, nx=True, px=_LOCK_TTL_MS),
        )
        if not won:
            return stored[0] if stored is not None else FitStamp(CLOSED_FIT, 0.0)
        try:
            return await self.refit()
        finally:
            await self.release_lock()

    async def release_lock(self) -> bool:
        """Release the refit lock if this replica still holds it; True when it did.

        A refit slower than the lock's TTL has lost the lock, maybe to another replica: deleting the key without
        checking its token would release that replica's lock instead (compare-and-delete, atomically in Redis).
        """
        released = await self._call(
            "PPL unlock",
            lambda: self._unlock(keys=[self.lock_key], args=[self._token]),  # type: ignore[misc]
        )
        return bool(released)
