"""A burst of ten times the normal rollout rate into a reward replica and the learner's side of Redis.

The harness is bench/bench_load_burst.py's (its docstring draws the pipeline): the learner's feeder releases
prompts under admission control, a stand-in rollout fleet answers them with ready-made groups at 5 groups/s, then
50, then 5 again, a real reward replica (``python -m reward_service``) scores them, and the learner's batch
assembler consumes the scored groups. One run, shorter than the benchmark's, feeds every test below; each checks
something that must hold at any speed: no assertion is on a rate or a duration (those go to
bench/results/load_burst.json).

What "bounded" means here: no work stream has a MAXLEN (a trimmed, never-consumed entry would be silent loss), so
their lengths grow with the run; the work *queued* in them is what admission control bounds, and the one capped
stream (the PPL window) holds its exact cap.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.redis_server import LocalRedis
from services.contracts import PROMPTS, ROLLOUTS, SCORED
from services.streams import run_key

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_load_burst as burst  # noqa: E402 - the benchmark's harness, importable once bench/ is on the path

pytestmark = pytest.mark.timeout(300)

PLAN = burst.BurstPlan(rate=5.0, factor=10.0, before_s=2.0, burst_s=4.0, after_s=2.0)
RSS_HEADROOM = 64 << 20
"""How far the replica's RSS may rise above its level after start-up: about 3000 groups' payloads, while
admission keeps at most 20 queued (observed: +3 MiB)."""


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Iterator[burst.BurstResult]:
    folder = tmp_path_factory.mktemp("burst")
    with LocalRedis(folder / "redis") as server:
        yield asyncio.run(burst.run_burst(server.url, "burst", PLAN, folder))


def produced_of(result: burst.BurstResult, *kinds: str) -> dict[str, str | None]:
    """rollouts entry id -> prompt id of the entries the fleet wrote of the given kinds."""
    return {entry: prompt for entry, (kind, prompt) in result.produced.items() if kind in kinds}


def test_the_burst_happened(result: burst.BurstResult) -> None:
    """A sanity check on counts, so that the bounds below are not met by a pipeline that never got busy."""
    by_phase = Counter(s.phase for s in result.samples)
    assert {"before", "burst", "after", "drain"} <= set(by_phase)
    produced = {phase: max(s.produced for s in result.samples if s.phase == phase) for phase in by_phase}
    assert produced["burst"] - produced["before"] > produced["before"]  # more in the burst than before it


def test_queued_work_stays_within_the_admission_bound(result: burst.BurstResult) -> None:
    peak = max(result.samples, key=lambda s: s.queued)
    assert peak.queued <= PLAN.queue_bound, (peak.phase, peak.backlog)
    # the feeder's own rule, released - returned <= (v + eta + 1) * P, at every sample
    assert all(s.outstanding <= s.version * PLAN.prompts_per_step + PLAN.queue_bound for s in result.samples)
    assert result.samples[-1].queued == 0  # drained: every released prompt went all the way through


def test_the_capped_window_holds_its_cap_and_no_work_stream_is_trimmed(result: burst.BurstResult) -> None:
    assert max(s.lengths["ppl_window.math"] for s in result.samples) <= result.window_capacity
    for name in (PROMPTS, ROLLOUTS, SCORED):  # a trim would shorten a stream between two samples
        lengths = [s.lengths[name] for s in result.samples]
        assert lengths == sorted(lengths), name
    # every entry the fleet wrote is still in the stream, in order: none was trimmed before it was consumed
    assert result.rollout_ids == list(result.produced)
    assert len(result.released) == result.feeder_released == result.samples[-1].lengths[PROMPTS]


def test_reward_replica_memory_stays_bounded(result: burst.BurstResult) -> None:
    peak = max(s.reward_rss for s in result.samples)
    assert peak <= result.baseline_rss + RSS_HEADROOM, (result.baseline_rss >> 20, peak >> 20)


def test_every_rollout_entry_is_scored_or_dead_lettered_with_its_reason(result: burst.BurstResult) -> None:
    groups = produced_of(result, "group")
    scored = Counter(g.rollout.task.prompt_id for g in result.scored)
    assert scored == Counter(groups.values())  # each scoreable group scored, exactly once
    rollouts_key = run_key("burst", ROLLOUTS)
    dead = {d.entry_id: d.error for d in result.dead if d.source_stream == rollouts_key}
    unscoreable, poison = produced_of(result, "unscoreable"), produced_of(result, "poison")
    assert unscoreable and poison
    assert set(dead) == set(unscoreable) | set(poison)
    assert all(dead[e].startswith("cannot score: math task") for e in unscoreable)
    assert all("not valid msgpack" in dead[e] for e in poison)
    assert len(scored) + len(dead) == len(result.produced)  # the count: nothing else is unaccounted for


def test_every_released_prompt_is_answered_once_and_settled(result: burst.BurstResult) -> None:
    released = Counter(result.released)
    assert max(released.values()) == 1
    answered = Counter(prompt for prompt in produced_of(result, "group", "unscoreable").values())
    assert answered == released
    # the learner: what it consumed is acked or held in the batch it was assembling when it stopped
    totals = result.learner_totals
    assert totals["consumed"] == result.learner_acked
    assert totals["used"] + totals["stale"] + totals["no_signal"] + totals["duplicate"] == totals["consumed"]
    assert result.learner_acked + len(result.learner_pending) == len(result.scored)
    held = {g.rollout.task.prompt_id for _, g in result.learner_pending if g is not None}
    assert set(result.ledger) <= held  # every other released prompt was settled: used, dropped or dead-lettered
