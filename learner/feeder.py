"""The prompt feeder: releases PromptTasks to the ``prompts`` stream in a deterministic order, under admission control.

Position: release ordinal k (0, 1, 2, ...) names feeder position (epoch, index) = divmod(k, len(items)) and the item
``EpochOrder(len(items), data.seed).item_index(epoch, index)``; its prompt id is ``{item_id}@{epoch}``.

Admission (ARCHITECTURE.md "Versions and staleness"): at policy version v the feeder keeps
``released - returned <= (v + eta + 1) * prompts_per_step``, where ``returned`` counts released prompts whose groups
were dropped (stale, no signal, dead-lettered). A dropped group gives its slot back; otherwise dynamic sampling,
which drops most groups of an easy dataset, would stall the learner below its batch size forever.

Exactly-once release across restarts: every release is a compare-and-set in Redis (one Lua script appends the
tasks and advances ``dipo:{run}:feeder.released`` only if it still equals the feeder's own count). On resume from
a checkpoint the Redis count may be ahead of the checkpointed one: those positions are already in the stream, in
flight, so the feeder skips them and puts them in its ledger instead of releasing them again.
docs/LEARNER_DATAFLOW.md gives the whole argument.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis.asyncio as aioredis

from learner.data import DataItem, EpochOrder
from services.config import RunConfig
from services.contracts import CONSUMER_GROUPS, DEADLETTER, FEEDER, PROMPTS, ROLLOUT_VERSIONS, ROLLOUTS, SCORED
from services.ledger import dead_letter_prompt_id
from services.protocol import PromptTask
from services.stream_upkeep import OutageBackoff, remove_dead_consumers, trim_acknowledged, trim_dead_letters
from services.streams import TRANSIENT_ERRORS, StreamSpec, call_with_retries, run_key

log = logging.getLogger(__name__)

RELEASE_CHUNK = 256
"""Largest number of tasks appended by one script call, so one call never carries an unbounded payload."""
DEADLETTER_SCAN = 256
"""Dead letters read per round trip when looking for prompts that will never come back."""
SEED_BITS = 31

# KEYS[1] = feeder hash, KEYS[2] = prompts stream; ARGV[1] = expected count, ARGV[2] = call token, ARGV[3..] = tasks.
# Appends the tasks only if the stored count equals the expected one, so a retried call (its reply was lost) or a
# second feeder can never append the same positions twice. Returns {1, new count} or {0, stored count, its token}.
_RELEASE_SCRIPT = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'released') or '0')
local expected = tonumber(ARGV[1])
if stored ~= expected then
  return {0, stored, redis.call('HGET', KEYS[1], 'token') or ''}
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[i])
end
local released = expected + #ARGV - 2
redis.call('HSET', KEYS[1], 'released', released, 'token', ARGV[2])
return {1, released}
"""


class FeederConflict(RuntimeError):
    """Another feeder released prompts for the same run: two learners must never feed one run."""


@dataclass
class FeederState:
    """What a checkpoint keeps of the feeder; JSON-able via to_dict/from_dict.

    ``ledger`` holds the release ordinals of prompts not yet settled as used or dropped (ordinals, not ids: the
    prompt id follows from the ordinal and the dataset, and integers keep the checkpoint small).
    """

    epoch: int = 0
    index: int = 0
    released: int = 0
    returned: int = 0
    ledger: list[int] = field(default_factory=list)
    dataset_size: int = 0
    deadletter_cursor: str = "0-0"

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeederState:
        """Rebuild from to_dict's output; raise ValueError on a missing, unknown or mistyped key."""
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"feeder state needs exactly the keys {sorted(names)}, got {sorted(data)}")
        ints = [data[name] for name in ("epoch", "index", "released", "returned", "dataset_size")]
        ledger = data["ledger"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise ValueError("feeder state: epoch, index, released, returned and dataset_size must be ints >= 0")
        if not isinstance(ledger, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ledger):
            raise ValueError("feeder state: ledger must be a list of release ordinals (ints)")
        if not isinstance(data["deadletter_cursor"], str):
            raise ValueError("feeder state: deadletter_cursor must be a stream id string")
        state = cls(**{**data, "ledger": list(ledger)})
        if state.dataset_size and state.epoch * state.dataset_size + state.index != state.released:
            raise ValueError(
                f"feeder state: position ({state.epoch}, {state.index}) disagrees with released={state.released}"
            )
        if any(not 0 <= k < state.released for k in state.ledger):
            raise ValueError("feeder state: every ledger ordinal must be below released")
        return state


def prompt_seed(base: int, epoch: int, index: int) -> int:
    """A per-prompt sampling seed derived from the base seed and the position (stable across processes)."""
    digest = hashlib.blake2b(f"dipo-sampling:{base}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << SEED_BITS)


class PromptFeeder:
    """Releases prompt tasks to ``prompts`` (one feeder per run: the learner's rank 0)."""

    def __init__(
        self, cfg: RunConfig, redis: aioredis.Redis, items: list[DataItem], state: FeederState | None = None
    ) -> None:
        if not items:
            raise ValueError("the prompt feeder needs at least one data item")
        self.cfg = cfg
        self.redis = redis
        self.items = items
        self.order = EpochOrder(len(items), cfg.data.seed)
        self.prompts = StreamSpec(cfg.name, PROMPTS)
        self.deadletter = StreamSpec(cfg.name, DEADLETTER)
        self.feeder_key = run_key(cfg.name, FEEDER)
        state = state or FeederState(dataset_size=len(items))
        if state.dataset_size not in (0, len(items)):
            raise ValueError(
                f"the checkpointed feeder saw {state.dataset_size} items but the data source now has {len(items)}: "
                "resume with the same data config"
            )
        self.released = state.released
        self.returned = state.returned
        self.deadletter_cursor = state.deadletter_cursor
        self._ledger: dict[str, int] = {self.prompt_id(k): k for k in sorted(state.ledger)}
        self._synced = False
        self._lock = asyncio.Lock()
        self._script = redis.register_script(_RELEASE_SCRIPT)
        self.on_release: Callable[[list[str]], None] | None = None
        """Called with the prompt ids of every successful release (the learner writes them to its ledger)."""

    # ------------------------------------------------------------------ positions

    def position(self, ordinal: int) -> tuple[int, int]:
        """(epoch, index) of release ordinal ``ordinal``."""
        return divmod(ordinal, len(self.items))

    def item(self, ordinal: int) -> DataItem:
        """The data item released at ``ordinal``."""
        epoch, index = self.position(ordinal)
        return self.items[self.order.item_index(epoch, index)]

    def prompt_id(self, ordinal: int) -> str:
        """The prompt id released at ``ordinal``: ``{item_id}@{epoch}``, unique per epoch."""
        return f"{self.item(ordinal).item_id}@{self.position(ordinal)[0]}"

    def task(self, ordinal: int, version: int, now: float | None = None) -> PromptTask:
        """The PromptTask of release ordinal ``ordinal``, dispatched at policy version ``version``."""
        epoch, index = self.position(ordinal)
        item = self.item(ordinal)
        s = self.cfg.sampling
        sampling = s.record(seed=None if s.seed is None else prompt_seed(s.seed, epoch, index))
        return PromptTask(
            prompt_id=f"{item.item_id}@{epoch}",
            task_kind=item.task_kind,
            messages=[dict(turn) for turn in item.messages],
            ground_truth=item.ground_truth,
            n=s.n,
            sampling=sampling,
            tools=list(item.tools),
            category=item.category,
            dispatch_version=version,
            epoch=epoch,
            index=index,
            created_at=time.time() if now is None else now,
        )

    # ------------------------------------------------------------------ admission

    @property
    def outstanding(self) -> int:
        """Released prompts that still hold an admission slot (released - returned)."""
        return self.released - self.returned

    def admission_bound(self, version: int) -> int:
        """Largest ``released - returned`` allowed at policy version ``version``."""
        lc = self.cfg.learner
        return (version + lc.max_staleness + 1) * lc.prompts_per_step

    def admitted(self, version: int) -> int:
        """How many prompts may be released now at ``version``."""
        return max(0, self.admission_bound(version) - self.outstanding)

    async def top_up(self, version: int) -> int:
        """Release as many prompts as admission allows at ``version``; returns how many were released."""
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        async with self._lock:
            if not self._synced:
                await self._sync()
            total = self.admitted(version)
            done = 0
            now = time.time()
            while done < total:
                chunk = min(RELEASE_CHUNK, total - done)
                await self._release([self.task(self.released + i, version, now) for i in range(chunk)])
                done += chunk
            return done

    def note_returned(self, count: int) -> None:
        """Give ``count`` admission slots back without naming the prompts (prefer :meth:`settle`, which is
        idempotent: a group delivered twice must not return two slots)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.returned += count

    def settle(self, used: Iterable[str] = (), dropped: Iterable[str] = ()) -> int:
        """Close ledger entries: used prompts keep their slot, dropped ones give it back; returns slots given back.

        Ids not in the ledger (a duplicate delivery, a prompt settled before) change nothing.
        """
        for prompt_id in used:
            self._ledger.pop(prompt_id, None)
        given_back = 0
        for prompt_id in dropped:
            if self._ledger.pop(prompt_id, None) is not None:
                given_back += 1
        self.returned += given_back
        return given_back

    def ledger(self) -> list[str]:
        """Prompt ids released and not yet settled, oldest first."""
        return sorted(self._ledger, key=self._ledger.__getitem__)

    def state(self) -> FeederState:
        """The feeder's checkpointable state."""
        epoch, index = self.position(self.released)
        return FeederState(
            epoch=epoch,
            index=index,
            released=self.released,
            returned=self.returned,
            ledger=sorted(self._ledger.values()),
            dataset_size=len(self.items),
            deadletter_cursor=self.deadletter_cursor,
        )

    async def run(self, version: Callable[[], int], stop: asyncio.Event, interval_s: float = 0.25) -> None:
        """Keep the stream topped up (and dead letters settled) until ``stop`` is set; for a background task.

        A Redis outage longer than one call's retries pauses the loop instead of ending it (nothing awaits this
        task until the learner stops, so an error here would silently stop the feeding).
        """
        outage = OutageBackoff("prompt feeder", self.cfg.redis.backoff_max_s)
        next_trim = time.monotonic() + self.cfg.streams.trim_interval_s
        while not stop.is_set():
            try:
                await self.scan_dead_letters()
                await self.top_up(version())
                if time.monotonic() >= next_trim:
                    await self.trim_streams()
                    next_trim = time.monotonic() + self.cfg.streams.trim_interval_s
            except TRANSIENT_ERRORS as exc:
                # A release whose reply was lost may have gone through: re-read Redis's count before the next
                # one, so those positions are adopted (see _sync) rather than mistaken for another feeder's.
                self._synced = False
                await outage.pause(exc, stop)
                continue
            outage.reset()
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass

    async def trim_streams(self) -> int:
        """Delete acknowledged entries older than ``streams.retain_acked_s`` from the work streams (they would
        otherwise grow for the whole run); returns how many went."""
        removed = 0
        retain = self.cfg.streams.retain_acked_s
        for name in (PROMPTS, ROLLOUTS, SCORED):
            trim = functools.partial(trim_acknowledged, self.redis, run_key(self.cfg.name, name), retain)
            removed += await self._call(f"trim {name}", trim)
        streams = self.cfg.streams
        letters = functools.partial(trim_dead_letters, self.redis, run_key(self.cfg.name, DEADLETTER),
                                    streams.deadletter_max_entries, streams.deadletter_retain_s)  # fmt: skip
        removed += await self._call("trim deadletter", letters)
        await self.remove_dead_consumers()
        if removed:
            log.debug("trimmed %d acknowledged stream entries", removed)
        return removed

    async def remove_dead_consumers(self) -> list[str]:
        """Remove consumers idle for ``streams.consumer_expiry_s`` with nothing pending from every work stream's
        group, and dead rollout servers' ``rollout_versions`` entries; returns the consumers removed."""
        expiry = self.cfg.streams.consumer_expiry_s
        removed: list[str] = []
        for name, group in CONSUMER_GROUPS.items():
            if group is None:
                continue
            expire = functools.partial(remove_dead_consumers, self.redis, run_key(self.cfg.name, name), group, expiry)
            gone = await self._call(f"expire consumers of {name}", expire)
            if gone:
                log.info("removed dead consumers of %s/%s: %s", name, group, ", ".join(gone))
            if gone and name == PROMPTS:  # rollout servers: their policy-version entries go with them
                forget = functools.partial(self.redis.hdel, run_key(self.cfg.name, ROLLOUT_VERSIONS), *gone)
                await self._call("HDEL rollout_versions", forget)  # type: ignore[arg-type]
            removed += gone
        return removed

    # ------------------------------------------------------------------ Redis

    async def _call(self, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        rc = self.cfg.redis
        return await call_with_retries(
            op,
            fn,
            timeout_s=rc.socket_timeout_s,
            retries=rc.retries,
            backoff_base_s=rc.backoff_base_s,
            backoff_cap_s=rc.backoff_max_s,
        )

    async def _stored_count(self) -> int:
        raw = await self._call("HGET feeder", lambda: self.redis.hget(self.feeder_key, "released"))
        return int(raw) if raw is not None else 0

    async def _sync(self) -> None:
        """Reconcile the checkpointed position with the releases Redis recorded (see the module docstring)."""
        stored = await self._stored_count()
        if stored > self.released:
            skipped = range(self.released, stored)
            log.info("feeder: positions %d..%d were released before the restart; skipping them", skipped[0], stored - 1)
            for ordinal in skipped:
                self._ledger[self.prompt_id(ordinal)] = ordinal
            self.released = stored
            if self.on_release is not None:  # a crash may have come between the release and its ledger line
                self.on_release([self.prompt_id(k) for k in skipped])
        elif stored < self.released:
            # Redis lost writes (no persistence, or a fresh server): what it lost cannot be told apart from what
            # is in flight, so those prompts stay in the ledger until they come back or are settled.
            log.warning(
                "feeder: Redis recorded %d releases, the checkpoint %d; keeping %d",
                stored,
                self.released,
                self.released,
            )
            await self._call("HSET feeder", lambda: self.redis.hset(self.feeder_key, "released", self.released))
        self._synced = True

    async def _release(self, tasks: list[PromptTask], *, retried: bool = False) -> None:
        token = uuid.uuid4().hex
        payloads = [t.to_bytes() for t in tasks]
        expected = self.released
        keys = [self.feeder_key, str(self.prompts)]
        result = await self._call("release prompts", lambda: self._script(keys=keys, args=[expected, token, *payloads]))
        ok, stored = int(result[0]), int(result[1])
        if not ok and stored < expected and not retried:
            # Redis came back without its last writes (a crash under appendfsync everysec or no): the releases it
            # forgot cannot be told apart from ones in flight, so they stay in the ledger; count on from ours.
            log.warning("feeder: Redis recorded %d releases, this feeder %d: it lost writes; keeping %d",
                        stored, expected, expected)  # fmt: skip
            await self._call("HSET feeder", lambda: self.redis.hset(self.feeder_key, "released", str(expected)))
            await self._release(tasks, retried=True)
            return
        if not ok:
            own = len(result) > 2 and bytes(result[2]).decode() == token
            if not own:
                raise FeederConflict(
                    f"run {self.cfg.name!r}: Redis recorded {stored} released prompts, this feeder expected "
                    f"{expected}; another feeder is releasing for this run"
                )
            # our call went through but its reply was lost, and the retry found its own write
            assert stored == expected + len(tasks), (stored, expected, len(tasks))
        for offset, t in enumerate(tasks):
            self._ledger[t.prompt_id] = expected + offset
        self.released = expected + len(tasks)
        if self.on_release is not None:
            self.on_release([t.prompt_id for t in tasks])

    async def scan_dead_letters(self) -> int:
        """Settle, as dropped, ledger prompts whose task, rollout or scored group was dead-lettered; returns slots
        given back. Letters whose payload cannot be decoded name no prompt and are skipped."""
        given_back = 0
        while True:
            read = functools.partial(
                self.redis.xrange,
                str(self.deadletter),
                min="(" + self.deadletter_cursor,
                max="+",
                count=DEADLETTER_SCAN,
            )
            rows = await self._call("XRANGE deadletter", read)
            for entry_id, raw in rows:
                prompt_id = dead_letter_prompt_id(raw)
                if prompt_id is not None:
                    given_back += self.settle(dropped=[prompt_id])
                self.deadletter_cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if len(rows) < DEADLETTER_SCAN:
                return given_back
