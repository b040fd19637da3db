"""Load burst: ten times the normal rollout rate into a reward replica and the learner's side of Redis.

Run: .venv/bin/python bench/bench_load_burst.py [--rate 5] [--factor 10] [--phase-s 10]
Writes bench/results/load_burst.json: scored groups/s before, during and after the burst, the reward replica's
peak RSS, the peak stream lengths and backlogs, and Redis's memory.

The pipeline, on a private redis-server:

    PromptFeeder ──prompts──▶ rollout fleet ──rollouts──▶ reward replica ──scored──▶ BatchAssembler
    (admission)              (this process)              (python -m reward_service)   (no training: ack at once)

The rollout fleet stands in for the rollout servers: it takes released prompts through the ``rollout`` consumer
group and answers each with a ready-made group (``--responses`` boxed answers of ``--tokens`` tokens, right or
wrong at random), writing the group and acknowledging the prompt in one transaction, as a rollout server does.
It is paced at ``--rate`` groups/s, then ``--factor`` times that for the burst, then ``--rate`` again. Every
``unscoreable_every``-th group carries a task no verifier accepts and every ``poison_every``-th is followed by an
undecodable entry: both must end in the dead-letter stream with their reason. The learner side trains on nothing
and acknowledges each batch at once, so the reward replica is the only slow stage.

No work stream is capped with MAXLEN (ARCHITECTURE.md: work streams are bounded by admission control, and a
trimmed entry that was never consumed would be lost without a trace). What admission bounds is the work queued in
Redis: at most (max_staleness + 1) * prompts_per_step prompts are released and not yet settled, so the entries
waiting in the three streams never exceed that, however fast the fleet is. The streams' lengths themselves grow
for the whole run: acknowledged entries are never deleted.

tests/faults/test_load_burst.py runs the same harness, shorter, and asserts on bounds and accounting only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis.asyncio as aioredis
import yaml
from _common import write_result

from learner.batch import BatchAssembler
from learner.data import DataItem
from learner.feeder import PromptFeeder
from runner.redis_server import LocalRedis
from services.config import RunConfig, load_config
from services.contracts import DEADLETTER, PROMPTS, ROLLOUTS, SCORED
from services.protocol import DeadLetter, PromptTask, Response, RolloutGroup, ScoredGroup
from services.streams import DATA_FIELD, StreamClient, StreamSpec, connect, run_key

REPO = Path(__file__).resolve().parents[1]
WORK_STREAMS = {PROMPTS: "rollout", ROLLOUTS: "reward", SCORED: "learner"}  # stream -> its consumer group
POISON = b"\x93not a rollout group"
MIB = 1 << 20


@dataclass(frozen=True)
class BurstPlan:
    """Rates, phase lengths and group shapes of one run of the harness."""

    rate: float = 5.0
    """Normal rate of the rollout fleet, groups/s."""
    factor: float = 10.0
    """The burst's rate is ``factor * rate``."""
    before_s: float = 10.0
    burst_s: float = 10.0
    after_s: float = 10.0
    responses: int = 8
    tokens: int = 256
    prompts_per_step: int = 4
    max_staleness: int = 4
    unscoreable_every: int = 40
    poison_every: int = 60
    sample_s: float = 0.1
    drain_timeout_s: float = 120.0

    @property
    def queue_bound(self) -> int:
        """Most prompts admission lets be released and not yet settled: the bound on work queued in Redis."""
        return (self.max_staleness + 1) * self.prompts_per_step

    def phases(self) -> list[tuple[str, float, float]]:
        """(name, fleet rate, seconds) of each phase."""
        return [
            ("before", self.rate, self.before_s),
            ("burst", self.rate * self.factor, self.burst_s),
            ("after", self.rate, self.after_s),
        ]


@dataclass
class Sample:
    """One observation of the pipeline, taken atomically (one MULTI) as far as Redis is concerned."""

    t: float
    phase: str
    lengths: dict[str, int]
    """XLEN of every stream of the run."""
    backlog: dict[str, int]
    """Entries of each work stream not yet consumed: lag + pending (for ``scored``: lag only; what the learner
    read is in its memory, not queued in Redis)."""
    reward_rss: int
    reward_tree_rss: int
    redis_memory: int
    produced: int
    outstanding: int
    """Prompts released and not given back (``released - returned``), at policy version ``version``."""
    version: int

    @property
    def queued(self) -> int:
        """Work queued in Redis, all streams together."""
        return sum(self.backlog.values())


@dataclass(repr=False)  # a full repr would print every scored group's arrays (asyncio.run computes one on exit)
class BurstResult:
    """What one run observed, and the end state of every stream, for the test's checks and the benchmark."""

    plan: BurstPlan
    samples: list[Sample]
    marks: dict[str, tuple[float, float]]
    """Phase name -> (start, end), monotonic seconds."""
    produced: dict[str, tuple[str, str | None]]
    """rollouts entry id -> (kind, prompt id): kind is ``group``, ``unscoreable`` or ``poison`` (no prompt id)."""
    released: list[str]
    """Prompt ids in the prompts stream, in order."""
    feeder_released: int
    rollout_ids: list[str]
    scored: list[ScoredGroup]
    dead: list[DeadLetter]
    learner_totals: dict[str, int]
    learner_acked: int
    learner_pending: list[tuple[str, ScoredGroup | None]]
    ledger: list[str]
    window_capacity: int
    baseline_rss: int
    drain_s: float

    def rates(self) -> dict[str, dict[str, float]]:
        """Per phase: groups/s the fleet offered and the reward replica scored."""
        out: dict[str, dict[str, float]] = {}
        for name, (start, end) in self.marks.items():
            inside = [s for s in self.samples if start <= s.t <= end]
            if len(inside) < 2:
                continue
            first, last = inside[0], inside[-1]
            span = last.t - first.t
            out[name] = {
                "offered_groups_per_s": round((last.produced - first.produced) / span, 2),
                "scored_groups_per_s": round((last.lengths[SCORED] - first.lengths[SCORED]) / span, 2),
            }
        return out

    def recovery_s(self) -> float | None:
        """Seconds from the end of the burst until the queued work fell back to its level before the burst."""
        before = [s.queued for s in self.samples if s.phase == "before"]
        burst_end = self.marks["burst"][1]
        level = max(before, default=0)
        for s in self.samples:
            if s.t >= burst_end and s.queued <= level:
                return round(s.t - burst_end, 2)
        return None

    def figures(self) -> dict[str, Any]:
        """The benchmark's result file content."""
        dead_reasons = Counter(_reason(d.error) for d in self.dead)
        peak = {name: max(s.lengths[name] for s in self.samples) for name in self.samples[0].lengths}
        return {
            "plan": dataclasses.asdict(self.plan),
            "groups_per_s": self.rates(),
            "recovery_s": self.recovery_s(),
            "drain_s": round(self.drain_s, 2),
            "reward_rss_mib": {
                "baseline": round(self.baseline_rss / MIB, 1),
                "peak": round(max(s.reward_rss for s in self.samples) / MIB, 1),
                "peak_with_verifier_processes": round(max(s.reward_tree_rss for s in self.samples) / MIB, 1),
            },
            "peak_stream_lengths": peak,
            "final_stream_lengths": self.samples[-1].lengths,
            "peak_backlog": {name: max(s.backlog[name] for s in self.samples) for name in WORK_STREAMS}
            | {"all": max(s.queued for s in self.samples), "admission_bound": self.plan.queue_bound},
            "redis_used_memory_mib": {
                "start": round(self.samples[0].redis_memory / MIB, 1),
                "end": round(self.samples[-1].redis_memory / MIB, 1),
            },
            "accounting": {
                "rollout_entries": len(self.produced),
                "scored": len(self.scored),
                "dead_lettered": dict(dead_reasons),
                "learner": self.learner_totals | {"held_in_unfinished_batch": len(self.learner_pending)},
            },
        }


def _reason(error: str) -> str:
    """A dead letter's error, shortened to its kind."""
    for prefix, kind in (("cannot score", "cannot score"), ("delivered ", "delivery limit")):
        if error.startswith(prefix):
            return kind
    return "undecodable"


# ---------------------------------------------------------------------------------------------------------------------
# the pieces


def math_items(count: int, seed: int = 0) -> list[DataItem]:
    """Two-term sums for the feeder."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        a, b = (int(x) for x in rng.integers(0, 100, 2))
        items.append(DataItem(f"s{i}", "math", [{"role": "user", "content": f"{a}+{b}?"}], str(a + b), [], "sum"))
    return items


def answer(task: PromptTask, rng: np.random.Generator, tokens: int) -> RolloutGroup:
    """A group answering ``task``: each response boxes the right sum or a wrong one, at the task's version."""
    gold = int(str(task.ground_truth))
    responses = []
    for _ in range(task.n):
        value = gold if rng.random() < 0.5 else gold + int(rng.integers(1, 9))
        length = int(rng.integers(tokens // 2, tokens + 1))
        text = "Adding the two numbers " + "step by step " * 8 + f"gives \\boxed{{{value}}}"
        ids = rng.integers(0, 49_000, length).astype("<u4")
        logprobs = (-rng.exponential(0.5, length)).astype("<f4")
        v = task.dispatch_version
        responses.append(Response.of_version(ids, logprobs, text, "stop", v))
    return RolloutGroup(task, np.arange(32, dtype="<u4"), responses, "fleet", time.time(), 0.0)


class RolloutFleet:
    """Stands in for the rollout servers: answers released prompts with ready-made groups at ``rate`` groups/s."""

    def __init__(self, cfg: RunConfig, redis: aioredis.Redis, plan: BurstPlan) -> None:
        self.plan = plan
        self.prompts = StreamClient.from_config(redis, cfg, PROMPTS, WORK_STREAMS[PROMPTS], "fleet")
        self.rollouts = StreamSpec(cfg.name, ROLLOUTS)
        self.rate = plan.rate
        self.produced: dict[str, tuple[str, str | None]] = {}
        self.groups = 0
        self._rng = np.random.default_rng(1)

    async def run(self, stop: asyncio.Event) -> None:
        """Answer prompts until ``stop`` is set; never faster than ``rate`` (a starved fleet does not catch up)."""
        next_at = time.monotonic()
        while not stop.is_set():
            got = await self.prompts.read_decoded(PromptTask.from_bytes, count=1, block_ms=100)
            for entry_id, task in got:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at, time.monotonic()) + 1.0 / self.rate
                await self._answer(entry_id, task)

    async def _answer(self, entry_id: str, task: PromptTask) -> None:
        self.groups += 1
        kind, group = "group", answer(task, self._rng, self.plan.tokens)
        if self.groups % self.plan.unscoreable_every == 0:  # a math task needs a string gold: no verifier takes it
            kind, group.task = "unscoreable", dataclasses.replace(task, ground_truth=[task.ground_truth])
        outputs = [group.to_bytes()]
        if self.groups % self.plan.poison_every == 0:
            outputs.append(POISON)
        # the outputs and the prompt's ack in one transaction, as RolloutWorker writes them (here with the ids back)
        async with self.prompts.redis.pipeline(transaction=True) as pipe:
            for data in outputs:
                pipe.xadd(str(self.rollouts), {DATA_FIELD: data})
            pipe.xack(self.prompts.key, WORK_STREAMS[PROMPTS], entry_id)
            *ids, _ = await pipe.execute()
        self.produced[_text(ids[0])] = (kind, task.prompt_id)
        for extra in ids[1:]:
            self.produced[_text(extra)] = ("poison", None)


class LearnerSide:
    """The learner's Redis side with no model: the feeder under admission, the assembler, an ack per batch."""

    def __init__(self, cfg: RunConfig, redis: aioredis.Redis) -> None:
        self.feeder = PromptFeeder(cfg, redis, math_items(512))
        self.assembler = BatchAssembler(cfg, redis, "learner-0", on_settled=self.feeder.settle)
        self.version = 0
        self.acked = 0

    async def consume(self, stop: asyncio.Event) -> None:
        """Next batch, acknowledge it at once (the real loop acknowledges after its checkpoint), next version."""
        while not stop.is_set():
            batch = await self.assembler.next_batch(self.version, stop)
            if batch is None:
                return
            await self.assembler.client.ack(batch.entry_ids)
            self.acked += len(batch.entry_ids)
            self.version += 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def observe(redis: aioredis.Redis, run: str) -> tuple[dict[str, int], dict[str, int], int]:
    """Stream lengths, work-stream backlogs and Redis's used memory, read in one transaction."""
    names = [*WORK_STREAMS, DEADLETTER, "ppl_window.math"]
    async with redis.pipeline(transaction=True) as pipe:
        for name in names:
            pipe.xlen(run_key(run, name))
        for name in WORK_STREAMS:
            pipe.xinfo_groups(run_key(run, name))
        pipe.info("memory")
        results = await pipe.execute()
    lengths = dict(zip(names, (int(x) for x in results[: len(names)]), strict=True))
    backlog: dict[str, int] = {}
    for (name, group), rows in zip(WORK_STREAMS.items(), results[len(names) : -1], strict=True):
        row = next(r for r in ({_text(k): v for k, v in row.items()} for row in rows) if _text(r["name"]) == group)
        lag = int(row["lag"]) if row.get("lag") is not None else 0
        backlog[name] = lag + (int(row["pending"]) if name != SCORED else 0)
    return lengths, backlog, int(results[-1]["used_memory"])


def rss(pid: int) -> tuple[int, int]:
    """Resident memory of a process, and of it with all its descendants (its verifier processes), in bytes."""
    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    tree = own
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += child.memory_info().rss
    return own, tree


def start_replica(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """One reward replica as a process, as ``dipo run`` starts it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "reward_service", "--config", str(config)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def write_config(folder: Path, run: str, url: str, plan: BurstPlan) -> Path:
    """The run config the replica and the learner side share."""
    path = folder / f"{run}.yaml"
    path.write_text(yaml.safe_dump({
        "name": run, "redis": {"url": url},
        "streams": {"block_ms": 100, "read_count": 16},
        "sampling": {"n": plan.responses, "max_new_tokens": 2 * plan.tokens},
        "learner": {"prompts_per_step": plan.prompts_per_step, "max_staleness": plan.max_staleness},
        "reward": {"verifier_workers": 1},
    }))  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------------------------------
# one run


async def run_burst(url: str, run: str, plan: BurstPlan, folder: Path) -> BurstResult:
    """Start the replica, run the three phases, drain, and read back every stream."""
    config = write_config(folder, run, url, plan)
    cfg = load_config(config, environ={})
    redis = connect(url, timeout_s=cfg.redis.socket_timeout_s)
    fleet = RolloutFleet(cfg, redis, plan)
    learner = LearnerSide(cfg, redis)
    for name, group in WORK_STREAMS.items():  # so that every backlog can be read from the first sample on
        await StreamClient(redis, StreamSpec(run, name), group, "setup").ensure_group()
    log = folder / f"{run}-reward.log"
    replica = start_replica(config, log)
    stop, feeder_stop, sampling = asyncio.Event(), asyncio.Event(), asyncio.Event()
    samples: list[Sample] = []
    marks: dict[str, tuple[float, float]] = {}
    phase = "warm-up"
    tasks: list[asyncio.Task[None]] = []

    async def sample_forever() -> None:
        while not sampling.is_set():
            lengths, backlog, memory = await observe(redis, run)
            own, tree = rss(replica.pid)
            samples.append(Sample(time.monotonic(), phase, lengths, backlog, own, tree, memory, fleet.groups,
                                  learner.feeder.outstanding, learner.version))  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sampling.wait(), plan.sample_s)

    try:
        deadline = time.monotonic() + 120
        while "consuming" not in log.read_text():
            if replica.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the reward replica did not start:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        baseline_rss = rss(replica.pid)[0]
        tasks = [
            asyncio.create_task(learner.feeder.run(lambda: learner.version, feeder_stop, 0.05)),
            asyncio.create_task(learner.consume(stop)),
            asyncio.create_task(fleet.run(stop)),
            asyncio.create_task(sample_forever()),
        ]
        for phase, rate, seconds in plan.phases():
            fleet.rate = rate
            start = time.monotonic()
            await asyncio.sleep(seconds)
            marks[phase] = (start, time.monotonic())
            _raise_failures(tasks, replica, log)
        phase = "drain"
        feeder_stop.set()  # nothing new is released: what was released must all come through
        fleet.rate = plan.rate * plan.factor
        drain_start = time.monotonic()
        while True:
            _raise_failures(tasks, replica, log)
            _, backlog, _ = await observe(redis, run)
            if sum(backlog.values()) == 0:
                break
            if time.monotonic() - drain_start > plan.drain_timeout_s:
                raise RuntimeError(f"the pipeline did not drain: backlog {backlog}\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        drain_s = time.monotonic() - drain_start
        await learner.feeder.scan_dead_letters()  # the feeder loop has stopped: settle the last dead letters
        await asyncio.sleep(2 * plan.sample_s)  # one more sample of the drained state
    finally:
        stop.set()
        feeder_stop.set()
        sampling.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        if replica.poll() is None:
            replica.terminate()
            replica.wait(60)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise RuntimeError(f"a pipeline task failed: {failures!r}")
    result = BurstResult(
        plan=plan,
        samples=samples,
        marks=marks,
        produced=fleet.produced,
        released=[PromptTask.from_bytes(f[b"d"]).prompt_id for _, f in await redis.xrange(run_key(run, PROMPTS))],
        feeder_released=learner.feeder.released,
        rollout_ids=[i.decode() for i, _ in await redis.xrange(run_key(run, ROLLOUTS))],
        scored=[ScoredGroup.from_bytes(f[b"d"]) for _, f in await redis.xrange(run_key(run, SCORED))],
        dead=[DeadLetter.from_bytes(f[b"d"]) for _, f in await redis.xrange(run_key(run, DEADLETTER))],
        learner_totals=dict(learner.assembler.totals),
        learner_acked=learner.acked,
        learner_pending=await learner.assembler.read_own_pending(),
        ledger=learner.feeder.ledger(),
        window_capacity=cfg.window_size,
        baseline_rss=baseline_rss,
        drain_s=drain_s,
    )
    await redis.aclose()
    return result


def _raise_failures(tasks: list[asyncio.Task[None]], replica: subprocess.Popen[bytes], log: Path) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"a pipeline task failed: {task.exception()!r}")
    if replica.poll() is not None:
        raise RuntimeError(f"the reward replica exited with {replica.returncode}:\n{log.read_text()[-3000:]}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5.0, help="normal rate of the rollout fleet, groups/s")
    parser.add_argument("--factor", type=float, default=10.0, help="the burst's rate over the normal one")
    parser.add_argument("--phase-s", type=float, default=10.0, help="length of each phase, seconds")
    args = parser.parse_args()
    plan = BurstPlan(rate=args.rate, factor=args.factor, before_s=args.phase_s, burst_s=args.phase_s,
                     after_s=args.phase_s)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as server:
        result = await run_burst(server.url, "burst", plan, Path(tmp))
    figures = result.figures()
    for name, rates in figures["groups_per_s"].items():
        print(f"{name:>6}: {rates}")
    print(f"reward RSS MiB: {figures['reward_rss_mib']}; peak backlog: {figures['peak_backlog']}")
    print(write_result("load_burst", figures))


if __name__ == "__main__":
    asyncio.run(main())
