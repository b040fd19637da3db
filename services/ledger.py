"""The run's ledger: which prompts were released, and which optimizer update used or dropped each one.

The learner's rank 0 appends one JSON line per event to ``<run_dir>/ledger.jsonl``:

- ``{"kind": "start", "step": S, "version": V, "resumed": bool, "pid": P}`` when a learner process starts (S and V
  are what it resumed from: 0 and 0 for a fresh run);
- ``{"kind": "release", "ids": [...]}`` after prompts were appended to the ``prompts`` stream;
- ``{"kind": "step", "step": k, "version": v, "used": [[prompt_id, behaviour_version], ...],
  "dropped": {"stale": [...], "no_signal": [...], "duplicate": [...]}}`` after optimizer step k (which made
  version v), before its checkpoint;
- ``{"kind": "checkpoint", "step": k, "version": v, "open": [...]}`` once the checkpoint of step k is on disk
  (``open``: released prompts not yet settled as used or dropped — in flight).

A crash loses the steps after the newest checkpoint: the restarted learner resumes from it and redoes them. The
reader therefore replays the file: a ``start`` record at step S discards every step and checkpoint record above S,
so what remains is the run's committed history. Releases are never discarded: a release ordinal always names the
same prompt and is never released twice (the feeder's compare-and-set in Redis), so the union of all release
records is what the run sent out. A line torn by a SIGKILL can only be the last one written by a process; the
reader skips lines that do not parse and counts them.

``check_ledger`` turns a replayed ledger (plus the prompts Redis reports as dead-lettered or still in a stream)
into the accounting the chaos runner asserts on: every released prompt used by exactly one committed update, or
dropped with a reason, or in flight at the end; anything else is lost, and a prompt used twice is doubled.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from services.contracts import PROMPTS, ROLLOUTS, SCORED
from services.protocol import DeadLetter, PromptTask, ProtocolError, RolloutGroup, ScoredGroup
from services.streams import DATA_FIELD

_DECODERS: dict[str, Callable[[bytes], PromptTask | RolloutGroup | ScoredGroup]] = {
    PROMPTS: PromptTask.from_bytes,
    ROLLOUTS: RolloutGroup.from_bytes,
    SCORED: ScoredGroup.from_bytes,
}


class LedgerWriter:
    """Appends ledger records; every record is flushed at once, so a SIGKILL loses at most a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = self.path.open("a", encoding="utf-8")
        self._torn_guard()

    def _torn_guard(self) -> None:
        """Start on a fresh line if a killed predecessor left a torn one (its half line then stays unparseable)."""
        if self.path.stat().st_size == 0:
            return
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                self._file.write("\n")
                self._file.flush()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def start(self, step: int, version: int, *, resumed: bool) -> None:
        self.write({"kind": "start", "step": step, "version": version, "resumed": resumed, "pid": os.getpid()})

    def release(self, prompt_ids: Sequence[str]) -> None:
        if prompt_ids:
            self.write({"kind": "release", "ids": list(prompt_ids)})

    def step(
        self, step: int, version: int, used: Iterable[tuple[str, int]], dropped: Mapping[str, Sequence[str]]
    ) -> None:
        self.write(
            {
                "kind": "step",
                "step": step,
                "version": version,
                "used": [[prompt_id, int(v)] for prompt_id, v in used],
                "dropped": {reason: list(ids) for reason, ids in dropped.items() if ids},
            }
        )

    def checkpoint(self, step: int, version: int, open_ids: Sequence[str]) -> None:
        self.write({"kind": "checkpoint", "step": step, "version": version, "open": list(open_ids)})

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class StepRecord:
    """One committed optimizer step."""

    step: int
    version: int
    used: tuple[tuple[str, int], ...]
    dropped: Mapping[str, tuple[str, ...]]


@dataclass
class Ledger:
    """A replayed ledger: the committed history of a run."""

    released: list[str] = field(default_factory=list)
    steps: dict[int, StepRecord] = field(default_factory=dict)
    checkpoints: dict[int, tuple[int, tuple[str, ...]]] = field(default_factory=dict)
    """step -> (version, open prompt ids) of every committed checkpoint."""
    starts: int = 0
    rollbacks: int = 0
    """Starts that discarded steps done after the checkpoint they resumed from."""
    discarded_steps: int = 0
    torn_lines: int = 0

    @property
    def final_checkpoint(self) -> int | None:
        """Step of the newest committed checkpoint."""
        return max(self.checkpoints) if self.checkpoints else None


def read_ledger(path: Path) -> Ledger:
    """Replay ``ledger.jsonl`` into the run's committed history (see the module docstring)."""
    ledger = Ledger()
    released: dict[str, None] = {}
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                kind = record["kind"]
            except (ValueError, KeyError, TypeError):
                ledger.torn_lines += 1
                continue
            if kind == "release":
                released.update(dict.fromkeys(record["ids"]))
            elif kind == "start":
                ledger.starts += 1
                base = int(record["step"])
                later = [k for k in ledger.steps if k > base]
                if later:
                    ledger.rollbacks += 1
                    ledger.discarded_steps += len(later)
                for k in later:
                    del ledger.steps[k]
                for k in [k for k in ledger.checkpoints if k > base]:
                    del ledger.checkpoints[k]
            elif kind == "step":
                ledger.steps[int(record["step"])] = StepRecord(
                    step=int(record["step"]),
                    version=int(record["version"]),
                    used=tuple((str(p), int(v)) for p, v in record["used"]),
                    dropped={reason: tuple(ids) for reason, ids in record["dropped"].items()},
                )
            elif kind == "checkpoint":
                ledger.checkpoints[int(record["step"])] = (int(record["version"]), tuple(record["open"]))
    ledger.released = list(released)
    return ledger


@dataclass
class LedgerCheck:
    """The accounting of every released prompt, and what is wrong with it (``problems`` empty when all is well)."""

    released: int
    used: int
    dropped: dict[str, int]
    dead_lettered: int
    in_flight: int
    lost: int
    doubled: int
    steps: int
    final_step: int | None
    versions_increase: bool
    problems: list[str]
    lost_ids: list[str] = field(default_factory=list)
    doubled_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "released": self.released,
            "used": self.used,
            "dropped": dict(self.dropped),
            "dead_lettered": self.dead_lettered,
            "in_flight": self.in_flight,
            "lost": self.lost,
            "doubled": self.doubled,
            "steps": self.steps,
            "final_step": self.final_step,
            "versions_increase": self.versions_increase,
            "problems": list(self.problems),
            "lost_ids": self.lost_ids[:50],
            "doubled_ids": self.doubled_ids[:50],
        }


def _walk_steps(committed: Sequence[StepRecord], problems: list[str]) -> tuple[Counter[str], dict[str, set[str]], bool]:
    """How often each prompt was used, which were dropped by reason, and whether versions only increased."""
    uses: Counter[str] = Counter()
    dropped: dict[str, set[str]] = {}
    versions_increase = True
    previous_version = -1
    for record in committed:
        if record.version <= previous_version:
            versions_increase = False
            problems.append(f"step {record.step}: version {record.version} after version {previous_version}")
        previous_version = record.version
        for prompt_id, behaviour in record.used:
            uses[prompt_id] += 1
            if behaviour >= record.version:
                problems.append(
                    f"step {record.step} (v{record.version}) trained on {prompt_id} from the future v{behaviour}"
                )
        for reason, ids in record.dropped.items():
            dropped.setdefault(reason, set()).update(ids)
    return uses, dropped, versions_increase


def check_ledger(
    ledger: Ledger, *, dead_lettered: Iterable[str] = (), in_streams: Iterable[str] = (), allow_lost: bool = False
) -> LedgerCheck:
    """Account for every released prompt of the committed history up to the final checkpoint.

    ``dead_lettered``: prompt ids named by the run's dead-letter stream. ``in_streams``: prompt ids still waiting in
    a stream (not yet delivered, or pending). A released prompt that is neither used, dropped nor dead-lettered
    counts as in flight only if it is in ``in_streams``; otherwise it was lost (with ``appendfsync everysec`` Redis
    may lose the last second of writes after a crash; ``allow_lost`` says whether that is a problem).
    """
    problems: list[str] = []
    final = ledger.final_checkpoint
    if final is None:
        return LedgerCheck(len(ledger.released), 0, {}, 0, 0, 0, 0, 0, None, True, ["no committed checkpoint"])
    committed = [ledger.steps[k] for k in sorted(ledger.steps) if k <= final]
    missing = sorted(set(range(1, final + 1)) - {r.step for r in committed})
    if missing:
        problems.append(f"steps without a ledger record: {missing[:20]}")
    uses, dropped, versions_increase = _walk_steps(committed, problems)
    used = set(uses)
    doubled_ids = sorted(p for p, n in uses.items() if n > 1)
    if doubled_ids:
        problems.append(f"{len(doubled_ids)} prompts used by more than one update, e.g. {doubled_ids[:5]}")
    # A duplicate drop is a second delivery of a group whose first copy was used or dropped: it settles nothing.
    settled_drops = set().union(*(ids for reason, ids in dropped.items() if reason != "duplicate")) - used
    both = sorted(set().union(*(ids for reason, ids in dropped.items() if reason != "duplicate")) & used)
    if both:
        problems.append(f"{len(both)} prompts both used and dropped, e.g. {both[:5]}")
    dead = set(dead_lettered) - used - settled_drops
    waiting = set(in_streams)
    released = set(ledger.released)
    unknown = sorted((used | settled_drops) - released)
    if unknown:
        problems.append(f"{len(unknown)} prompts used or dropped but never released, e.g. {unknown[:5]}")
    accounted = used | settled_drops | dead
    in_flight = (released - accounted) & waiting
    lost_ids = sorted(released - accounted - in_flight)
    if lost_ids and not allow_lost:
        problems.append(f"{len(lost_ids)} released prompts were neither used, dropped nor in flight: {lost_ids[:5]}")
    return LedgerCheck(
        released=len(released),
        used=len(used),
        dropped={reason: len(ids - used) for reason, ids in sorted(dropped.items()) if reason != "duplicate"}
        | {"duplicate_deliveries": len(dropped.get("duplicate", set()))},
        dead_lettered=len(dead),
        in_flight=len(in_flight),
        lost=len(lost_ids),
        doubled=len(doubled_ids),
        steps=len(committed),
        final_step=final,
        versions_increase=versions_increase,
        problems=problems,
        lost_ids=lost_ids,
        doubled_ids=doubled_ids,
    )


def entry_prompt_id(stream: str, raw: Mapping[bytes, bytes]) -> str | None:
    """The prompt id of one entry of the prompts, rollouts or scored stream; None when it cannot be decoded."""
    decoder = _DECODERS.get(stream.rsplit(":", 1)[-1])
    payload = raw.get(DATA_FIELD.encode())
    if decoder is None or payload is None:
        return None
    try:
        message = decoder(payload)
    except ProtocolError:
        return None
    return _prompt_id(message)


def dead_letter_prompt_id(raw: Mapping[bytes, bytes]) -> str | None:
    """The prompt id inside one dead letter, or None when the letter or its payload is not decodable."""
    data = raw.get(DATA_FIELD.encode())
    if data is None:
        return None
    try:
        letter = DeadLetter.from_bytes(data)
    except ProtocolError:
        return None
    if letter.prompt_id:  # recorded when the entry was dead-lettered, before its payload was clipped
        return letter.prompt_id
    payload = letter.fields.get(DATA_FIELD)
    return None if payload is None else entry_prompt_id(letter.source_stream, {DATA_FIELD.encode(): payload})


def _prompt_id(message: PromptTask | RolloutGroup | ScoredGroup) -> str:
    if isinstance(message, PromptTask):
        return message.prompt_id
    if isinstance(message, RolloutGroup):
        return message.task.prompt_id
    return message.rollout.task.prompt_id
