"""Batch assembly: read ``scored`` groups, drop stale / no-signal / duplicate ones, turn the rest into samples.

The assembler reads through the consumer group ``learner`` and never acknowledges: the loop acknowledges a step's
``entry_ids`` once a checkpoint holding that step is on disk. So after a crash the entries consumed since the last
checkpoint are still pending for this consumer, and a new assembler with the same consumer name reads them again,
first and in order, before any new entry: the resumed run sees exactly the groups the crashed one saw.
docs/LEARNER_DATAFLOW.md describes the whole data flow.

Samples travel from rank 0 to the other ranks as ``encode_samples`` bytes: msgpack with packed little-endian
arrays, never pickle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgpack
import numpy as np
import redis.asyncio as aioredis

from learner.advantages import group_advantages
from learner.provenance import Provenance
from services.config import RunConfig
from services.contracts import LEARNER_CONSUMER, LEARNER_GROUP, SCORED
from services.contracts import MetricKey as K
from services.protocol import ProtocolError, ScoredGroup
from services.stream_upkeep import OutageBackoff
from services.streams import DATA_FIELD, TRANSIENT_ERRORS, Entry, StreamClient, call_with_retries

log = logging.getLogger(__name__)

DROP_REASONS = ("stale", "no_signal", "duplicate")
SEEN_CAPACITY = 1_000_000
"""Used prompt ids remembered for duplicate detection; duplicates arrive within minutes, so this is ample."""
HISTORY = 64
"""Recent batches whose used ids :meth:`BatchAssembler.state` can leave out (a loop that prefetches batches)."""
SAMPLES_TAG = "samples"
SAMPLES_VERSION = 1

_U32, _F32, _F64, _I64, _U8 = (np.dtype(t) for t in ("<u4", "<f4", "<f8", "<i8", "<u1"))

Settled = Callable[[list[str], list[str]], Any]
"""Callback ``(used_prompt_ids, dropped_prompt_ids)``; wire it to :meth:`learner.feeder.PromptFeeder.settle`."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One response to train on, with its prompt, behaviour log-probs and group-relative advantage."""

    group_id: str
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    behaviour_logprobs: np.ndarray
    advantage: float
    temperature: float
    version: int
    trainable: bool = True
    """False when the loss must ignore the response (overlong filter): it then counts in no denominator."""

    def __post_init__(self) -> None:
        if len(self.behaviour_logprobs) != len(self.response_ids):
            raise ValueError(
                f"sample {self.group_id}: {len(self.behaviour_logprobs)} log-probs for "
                f"{len(self.response_ids)} response tokens"
            )

    @property
    def length(self) -> int:
        """Prompt plus response tokens: the sequence length the train step sees."""
        return len(self.prompt_ids) + len(self.response_ids)


# ---------------------------------------------------------------------------------------------------- sample codec


def encode_samples(samples: Sequence[Sample]) -> bytes:
    """Pack samples column-wise as one msgpack map with raw little-endian arrays."""

    def cat(arrays: Iterable[np.ndarray], dtype: np.dtype[Any]) -> bytes:
        parts = [np.asarray(a, dtype=dtype) for a in arrays]
        return np.concatenate(parts).tobytes() if parts else b""

    def col(values: Iterable[Any], dtype: np.dtype[Any]) -> bytes:
        return np.asarray(list(values), dtype=dtype).tobytes()

    body = {
        "v": SAMPLES_VERSION,
        "t": SAMPLES_TAG,
        "group_id": [s.group_id for s in samples],
        "prompt_len": col((len(s.prompt_ids) for s in samples), _U32),
        "response_len": col((len(s.response_ids) for s in samples), _U32),
        "prompt_ids": cat((s.prompt_ids for s in samples), _U32),
        "response_ids": cat((s.response_ids for s in samples), _U32),
        "logprobs": cat((s.behaviour_logprobs for s in samples), _F32),
        "advantage": col((s.advantage for s in samples), _F64),
        "temperature": col((s.temperature for s in samples), _F64),
        "version": col((s.version for s in samples), _I64),
        "trainable": col((s.trainable for s in samples), _U8),
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _column(body: dict[str, Any], name: str, dtype: np.dtype[Any], length: int | None = None) -> np.ndarray:
    raw = body[name]
    if not isinstance(raw, bytes) or len(raw) % dtype.itemsize:
        raise ProtocolError(f"samples.{name}: expected packed {dtype.str} bytes")
    array = np.frombuffer(raw, dtype=dtype).copy()
    if length is not None and len(array) != length:
        raise ProtocolError(f"samples.{name}: {len(array)} values, expected {length}")
    return array


def decode_samples(data: bytes | bytearray | memoryview) -> list[Sample]:
    """Strict inverse of :func:`encode_samples`; raise ProtocolError (a ValueError) on malformed input."""
    try:
        body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as exc:
        raise ProtocolError(f"samples: not valid msgpack ({type(exc).__name__}: {exc})") from exc
    keys = {"v", "t", "group_id", "prompt_len", "response_len", "prompt_ids", "response_ids", "logprobs"}
    keys |= {"advantage", "temperature", "version", "trainable"}
    if not isinstance(body, dict) or set(body) != keys:
        raise ProtocolError(f"samples: expected a map with keys {sorted(keys)}")
    if body["v"] != SAMPLES_VERSION or body["t"] != SAMPLES_TAG:
        raise ProtocolError(f"samples: unsupported header v={body['v']!r} t={body['t']!r}")
    group_ids = body["group_id"]
    if not isinstance(group_ids, list) or not all(isinstance(g, str) for g in group_ids):
        raise ProtocolError("samples.group_id: expected a list of strings")
    n = len(group_ids)
    prompt_len = _column(body, "prompt_len", _U32, n).astype(np.int64)
    response_len = _column(body, "response_len", _U32, n).astype(np.int64)
    prompt_ids = _column(body, "prompt_ids", _U32, int(prompt_len.sum()))
    response_ids = _column(body, "response_ids", _U32, int(response_len.sum()))
    logprobs = _column(body, "logprobs", _F32, int(response_len.sum()))
    advantage, temperature = _column(body, "advantage", _F64, n), _column(body, "temperature", _F64, n)
    version, trainable = _column(body, "version", _I64, n), _column(body, "trainable", _U8, n)
    p_ends, r_ends = np.cumsum(prompt_len), np.cumsum(response_len)
    return [
        Sample(
            group_id=group_ids[i],
            prompt_ids=prompt_ids[p_ends[i] - prompt_len[i] : p_ends[i]],
            response_ids=response_ids[r_ends[i] - response_len[i] : r_ends[i]],
            behaviour_logprobs=logprobs[r_ends[i] - response_len[i] : r_ends[i]],
            advantage=float(advantage[i]),
            temperature=float(temperature[i]),
            version=int(version[i]),
            trainable=bool(trainable[i]),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------------- micro-batches


class HasLength(Protocol):
    """Anything with a token length: a Sample, or a packed row of learner/packing.py."""

    @property
    def length(self) -> int:
        """Tokens it occupies in a micro-batch row."""
        ...


_Item = TypeVar("_Item", bound=HasLength)


def micro_batches(samples: Sequence[_Item], token_budget: int) -> list[list[_Item]]:
    """Split samples (or packed rows) into micro-batches of similar length whose padded size (count x longest) fits
    the budget.

    Longest first, so a budget that is too small fails on the first micro-batch; a sample longer than the budget
    gets a micro-batch of its own. Every sample appears exactly once.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    for sample in sorted(samples, key=lambda s: s.length, reverse=True):
        # descending order: the first sample of `current` is its longest
        if current and (len(current) + 1) * current[0].length > token_budget:
            batches.append(current)
            current = []
        current.append(sample)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------------- batches


@dataclass
class StepBatch:
    """Everything one optimizer step consumed from ``scored``."""

    samples: list[Sample]
    entry_ids: list[str]
    """Every scored entry consumed for this step, used or dropped: acknowledge them after the next checkpoint."""
    used: list[ScoredGroup]
    stats: dict[str, float]
    """Per-step metrics under docs/METRICS.md's metrics.jsonl names (NaN where there is no value)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """This step's drops by reason (``stats`` holds the cumulative counts)."""
    returned_ids: list[str] = field(default_factory=list)
    """Prompt ids dropped as stale or without signal: their admission slots go back to the feeder."""
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)
    """This step's dropped prompt ids by reason (duplicates included), for the run's ledger."""
    seq: int = 0
    """1 for the assembler's first batch, then 2, 3, ..."""
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def used_ids(self) -> list[str]:
        """Prompt ids of the used groups."""
        return [g.rollout.task.prompt_id for g in self.used]


@dataclass
class AssemblerState:
    """What a checkpoint keeps of the assembler: used prompt ids (duplicate detection) and cumulative counts."""

    seen_ids: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict."""
        return {"seen_ids": list(self.seen_ids), "totals": dict(self.totals)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssemblerState:
        """Rebuild from to_dict's output; raise ValueError on a malformed one."""
        seen, totals = data.get("seen_ids"), data.get("totals")
        if set(data) != {"seen_ids", "totals"} or not isinstance(seen, list) or not isinstance(totals, dict):
            raise ValueError("assembler state needs exactly `seen_ids` (list) and `totals` (map)")
        if not all(isinstance(s, str) for s in seen) or not all(isinstance(v, int) for v in totals.values()):
            raise ValueError("assembler state: seen_ids must be strings and totals ints")
        return cls(list(seen), dict(totals))


def carries_signal(group: ScoredGroup, alpha: float) -> bool:
    """Whether dynamic sampling keeps the group. The reward service's ``signal`` counts a reallocation as signal;
    with ``alpha == 0`` the reallocated rewards weigh nothing, so only a spread of R counts, exactly as in DAPO
    (a reallocated all-equal group would otherwise take a batch slot and train with zero advantages)."""
    if not group.signal:
        return False
    return alpha > 0 or bool(np.ptp(group.reward) > 0)


def group_samples(group: ScoredGroup, cfg: RunConfig) -> list[Sample]:
    """The samples of one used group, with advantages A = norm(R) + alpha * norm(Rr) (DIPO_SPEC.md section 5).

    The advantage is the same for every loss (dapo, grpo, drgrpo): the losses differ in how they aggregate tokens;
    ``learner.norm_by_std`` chooses Dr.GRPO's centring-only advantage.
    """
    lc = cfg.learner
    advantages = group_advantages(
        group.reward, group.realloc_reward, alpha=lc.alpha, std_ddof=lc.std_ddof, norm_by_std=lc.norm_by_std
    )
    mask_truncated = cfg.reward.overlong.filter_truncated
    task = group.rollout.task
    return [
        Sample(
            group_id=task.prompt_id,
            prompt_ids=group.rollout.prompt_token_ids,
            response_ids=r.token_ids,
            behaviour_logprobs=r.logprobs,
            advantage=float(a),
            temperature=float(task.sampling.temperature),
            version=r.version_first,
            trainable=not (mask_truncated and r.finish_reason == "length"),
        )
        for r, a in zip(group.rollout.responses, advantages, strict=True)
    ]


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def batch_stats(consumed: Sequence[ScoredGroup], used: Sequence[ScoredGroup], version: int) -> dict[str, float]:
    """Step metrics of the consumed and used groups (docs/METRICS.md names; NaN where there is no value).

    Reward service diagnostics (group kinds, reallocations, gate, tau, perplexities, quadrants) cover every
    consumed group, since dynamic sampling drops most easy and hard ones; what was trained on (reward, accuracy,
    tokens, staleness) covers the used groups.
    """
    n_consumed = len(consumed)
    stats: dict[str, float] = {"groups_consumed": float(n_consumed), "groups_used": float(len(used))}
    for kind in ("easy", "normal", "hard"):
        stats[f"kind_{kind}"] = sum(g.group_kind == kind for g in consumed) / n_consumed if n_consumed else math.nan
    for action in ("reward", "penalty"):
        stats[f"realloc_{action}"] = float(sum(g.action == action for g in consumed))
    stats[K.GATE_OPEN_RATIO] = sum(g.gate_open for g in consumed) / n_consumed if n_consumed else math.nan
    stats[K.TAU] = _mean([g.tau for g in consumed if math.isfinite(g.tau)])
    ppl: dict[bool, list[float]] = {True: [], False: []}
    quadrants = {"CL": 0, "CH": 0, "EL": 0, "EH": 0}
    for g in consumed:
        for p, c in zip(g.perplexity.tolist(), g.correct.tolist(), strict=True):
            if math.isnan(p):  # an empty response has no perplexity
                continue
            ppl[bool(c)].append(p)
            quadrants[("C" if c else "E") + ("L" if p < g.tau else "H")] += 1
    stats[K.PPL_CORRECT] = _mean([p for p in ppl[True] if math.isfinite(p)])
    stats[K.PPL_WRONG] = _mean([p for p in ppl[False] if math.isfinite(p)])
    placed = sum(quadrants.values())
    for name, count in quadrants.items():
        stats[f"quad_{name}"] = count / placed if placed else math.nan
    rewards = [float(x) for g in used for x in g.reward]
    stats[K.REWARD_MEAN] = _mean(rewards)
    stats[K.ACCURACY] = _mean([float(x) for g in used for x in g.correct])
    lags = [version - g.oldest_version for g in used]
    stats[K.STALENESS_MEAN] = _mean(lags)
    stats[K.STALENESS_MAX] = float(max(lags)) if lags else math.nan
    stats[K.GEN_TOKENS] = float(sum(len(r.token_ids) for g in consumed for r in g.rollout.responses))
    return stats


class BatchAssembler:
    """Collects ``learner.prompts_per_step`` useful scored groups per step from the ``scored`` stream."""

    def __init__(
        self,
        cfg: RunConfig,
        redis: aioredis.Redis,
        consumer: str = LEARNER_CONSUMER,
        seen_ids: Iterable[str] = (),
        *,
        totals: Mapping[str, int] | None = None,
        on_settled: Settled | None = None,
        seen_capacity: int = SEEN_CAPACITY,
        provenance: Provenance | None = None,
    ) -> None:
        self.cfg = cfg
        self.provenance = provenance
        """Checks that each group's weights are the learner's (None: every group is trusted, as in tests)."""
        self.redis = redis
        self.consumer = consumer
        self.client = StreamClient.from_config(redis, cfg, SCORED, LEARNER_GROUP, consumer)
        self.on_settled = on_settled
        self.seen_capacity = seen_capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember(seen_ids)
        self.totals: dict[str, int] = {reason: 0 for reason in DROP_REASONS} | {"consumed": 0, "used": 0,
                                                                                 "provenance": 0}  # fmt: skip
        self.totals.update(totals or {})
        self._backlog: deque[tuple[str, ScoredGroup | None]] = deque()  # None: entry deleted while pending
        self._started = False
        self._seq = 0
        self._history: deque[tuple[int, list[str]]] = deque(maxlen=HISTORY)
        self._decode = functools.partial(ScoredGroup.from_bytes, max_bytes=cfg.streams.max_payload_bytes)
        self._outage = OutageBackoff(f"batch assembler {consumer}", cfg.redis.backoff_max_s)

    def _remember(self, ids: Iterable[str]) -> None:
        for prompt_id in ids:
            self._seen[prompt_id] = None
            self._seen.move_to_end(prompt_id)
        while len(self._seen) > self.seen_capacity:
            self._seen.popitem(last=False)

    def state(self, through: StepBatch | None = None) -> AssemblerState:
        """Checkpointable state as of batch ``through`` (default: the latest), leaving out later batches' ids."""
        later = [ids for seq, ids in self._history if through is not None and seq > through.seq]
        excluded = {prompt_id for ids in later for prompt_id in ids}
        totals = dict(through.totals) if through is not None else dict(self.totals)
        return AssemblerState([i for i in self._seen if i not in excluded], totals)

    # ------------------------------------------------------------------ reading

    async def start(self) -> None:
        """Create the consumer group if needed and queue this consumer's pending entries (read before a crash and
        never acknowledged) ahead of new ones; next_batch calls it once."""
        await self.client.ensure_group()
        replayed = await self.read_own_pending()
        self._backlog.extendleft(reversed(replayed))
        if replayed:
            log.info(
                "re-reading %d scored entries pending for %s since before the restart", len(replayed), self.consumer
            )
        self._started = True

    async def read_own_pending(self) -> list[tuple[str, ScoredGroup | None]]:
        """Every entry pending for this consumer, oldest first (XREADGROUP from id 0). Entries deleted from the
        stream while pending come back as (id, None) so they can be acknowledged; undecodable ones are
        dead-lettered."""
        key, group, consumer = self.client.key, LEARNER_GROUP, self.consumer
        rc, count = self.cfg.redis, self.cfg.streams.read_count
        out: list[tuple[str, ScoredGroup | None]] = []
        cursor = "0"
        while True:
            start = cursor
            resp = await call_with_retries(
                f"XREADGROUP pending on {key}",
                functools.partial(self.redis.xreadgroup, group, consumer, {key: start}, count=count),
                timeout_s=rc.socket_timeout_s,
                retries=rc.retries,
                backoff_base_s=rc.backoff_base_s,
                backoff_cap_s=rc.backoff_max_s,
            )
            rows = [(_text(i), raw or {}) for _, entries in (resp or []) for i, raw in entries]
            if not rows:
                return out
            bad: list[tuple[Entry, str]] = []
            for entry_id, raw in rows:
                fields = {_text(k): v for k, v in raw.items()}
                if not fields:
                    out.append((entry_id, None))
                    continue
                try:
                    data = fields.get(DATA_FIELD)
                    if data is None:
                        raise ProtocolError(f"entry has no {DATA_FIELD!r} field")
                    out.append((entry_id, self._decode(data)))
                except ProtocolError as exc:
                    bad.append((Entry(entry_id, fields), str(exc)))
            await self.client.dead_letter(bad)
            cursor = rows[-1][0]

    async def _fill(self, wanted: int) -> None:
        got = await self.client.read_decoded(
            self._decode, count=min(self.cfg.streams.read_count, wanted), block_ms=self.cfg.streams.block_ms
        )
        self._backlog.extend(got)

    def _verdict(self, group: ScoredGroup, version: int, batch_seen: set[str]) -> str:
        prompt_id = group.rollout.task.prompt_id
        if prompt_id in self._seen or prompt_id in batch_seen:
            return "duplicate"
        if group.oldest_version < version - self.cfg.learner.max_staleness:
            return "stale"
        if not carries_signal(group, self.cfg.learner.alpha) and self.cfg.learner.dynamic_sampling:
            return "no_signal"
        return "used"

    async def next_batch(self, version: int, stop: asyncio.Event | None = None) -> StepBatch | None:
        """The next step's batch at policy version ``version``; None if ``stop`` (an asyncio.Event) was set first.

        On a stop the entries taken so far go back to the front of the queue, so nothing is lost or reordered.
        """
        began = time.monotonic()
        if not self._started:
            await self.start()
        want = self.cfg.learner.prompts_per_step
        taken: list[tuple[str, ScoredGroup | None]] = []
        used: list[ScoredGroup] = []
        batch_seen: set[str] = set()
        dropped = {reason: 0 for reason in DROP_REASONS}
        dropped_ids: dict[str, list[str]] = {reason: [] for reason in DROP_REASONS}
        returned_ids: list[str] = []
        while len(used) < want:
            if stop is not None and stop.is_set():
                self._backlog.extendleft(reversed(taken))
                return None
            if not self._backlog:
                try:
                    await self._fill(want - len(used))
                except TRANSIENT_ERRORS as exc:  # an outage longer than one read's retries: wait, not crash
                    await self._outage.pause(exc, stop)
                else:
                    self._outage.reset()
                continue
            entry_id, group = self._backlog.popleft()
            if group is not None and not await self._trusted(entry_id, group, stop):
                continue
            taken.append((entry_id, group))
            if group is None:
                continue
            verdict = self._verdict(group, version, batch_seen)
            if verdict == "used":
                used.append(group)
                batch_seen.add(group.rollout.task.prompt_id)
                continue
            dropped[verdict] += 1
            dropped_ids[verdict].append(group.rollout.task.prompt_id)
            if verdict != "duplicate":  # a duplicate's slot went back (or was used) with its first copy
                returned_ids.append(group.rollout.task.prompt_id)
                if self.on_settled is not None:
                    self.on_settled([], [group.rollout.task.prompt_id])
        batch = self._finish(taken, used, dropped, returned_ids, version, time.monotonic() - began)
        batch.dropped_ids = dropped_ids
        return batch

    async def _trusted(self, entry_id: str, group: ScoredGroup, stop: asyncio.Event | None) -> bool:
        """Whether the group's weights are the learner's; an untrusted group is dead-lettered with the reason (and
        its prompt settled as dropped). On a Redis outage the entry goes back to the front of the queue."""
        if self.provenance is None:
            return True
        try:
            problem = await self.provenance.check(group.rollout)
            if problem is not None:
                await self.client.dead_letter([(Entry(entry_id, {DATA_FIELD: group.to_bytes()}), problem)])
        except TRANSIENT_ERRORS as exc:
            self._backlog.appendleft((entry_id, group))
            await self._outage.pause(exc, stop)
            return False
        if problem is None:
            return True
        self.totals["provenance"] += 1
        if self.on_settled is not None:
            self.on_settled([], [group.rollout.task.prompt_id])
        return False

    def _finish(
        self,
        taken: list[tuple[str, ScoredGroup | None]],
        used: list[ScoredGroup],
        dropped: dict[str, int],
        returned_ids: list[str],
        version: int,
        waited_s: float,
    ) -> StepBatch:
        consumed = [g for _, g in taken if g is not None]
        samples = [s for g in used for s in group_samples(g, self.cfg)]
        used_ids = [g.rollout.task.prompt_id for g in used]
        self._remember(used_ids)
        for reason, count in dropped.items():
            self.totals[reason] += count
        self.totals["consumed"] += len(consumed)
        self.totals["used"] += len(used)
        self._seq += 1
        self._history.append((self._seq, used_ids))
        if self.on_settled is not None:
            self.on_settled(used_ids, [])
        stats = batch_stats(consumed, used, version)
        stats |= {f"dropped_{reason}": float(self.totals[reason]) for reason in DROP_REASONS}
        stats[K.DROPPED_PROVENANCE] = float(self.totals.get("provenance", 0))
        stats["returned"] = float(len(returned_ids))
        stats[K.TOKENS] = float(sum(len(s.response_ids) for s in samples if s.trainable))
        stats[K.WAIT_SECONDS] = waited_s
        return StepBatch(
            samples=samples,
            entry_ids=[entry_id for entry_id, _ in taken],
            used=used,
            stats=stats,
            dropped=dropped,
            returned_ids=returned_ids,
            seq=self._seq,
            totals=dict(self.totals),
        )


def _text(value: bytes | str) -> str:
    # Field names are whatever a producer wrote: a non-UTF-8 one must not stop the replay of pending entries.
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
