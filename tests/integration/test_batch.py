"""Batch assembly against a real Redis: staleness / signal / duplicate filtering, advantages, exact resume, codec."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
import torch
from factories import math_group

from learner.advantages import group_advantages
from learner.batch import (
    AssemblerState,
    BatchAssembler,
    Sample,
    StepBatch,
    batch_stats,
    decode_samples,
    encode_samples,
    micro_batches,
)
from learner.losses import truncated_is_weights
from learner.provenance import Provenance, canary_reference
from services.canary import CanaryScore, encode_scorings, server_field
from services.config import RunConfig
from services.contracts import CANARIES, DEADLETTER, QUARANTINE, SCORED
from services.protocol import DeadLetter, ProtocolError, ScoredGroup
from services.streams import DATA_FIELD, StreamSpec, run_key


def scored(
    prompt_id: str,
    answers: list[str],
    *,
    version: int = 0,
    signal: bool = True,
    nlls: list[float] | None = None,
    realloc: list[float] | None = None,
    action: str = "none",
    gate: bool = True,
    tau: float = 1.8,
    finish: list[str] | None = None,
) -> ScoredGroup:
    """A scored group of math responses (gold answer 7) as the reward service would write it."""
    rollout = math_group(prompt_id, answers, "7", nlls, version)
    for r, reason in zip(rollout.responses, finish or [], strict=False):
        r.finish_reason = reason
    correct = np.array([a == "7" for a in answers], dtype=np.uint8)
    ppl = np.array([math.exp(-float(r.logprobs.mean())) for r in rollout.responses], dtype=np.float32)
    kind = "easy" if correct.all() else "hard" if not correct.any() else "normal"
    return ScoredGroup(
        rollout=rollout,
        status=["correct" if c else "wrong" for c in correct],
        correct=correct,
        reward=correct.astype(np.float32),
        realloc_reward=np.array(realloc or [0.0] * len(answers), dtype=np.float32),
        perplexity=ppl,
        group_kind=kind,
        action=action,
        tau=tau,
        gate_open=gate,
        fit_window=32,
        fit_at=0.0,
        signal=signal,
        scorer_id="test",
        scored_at=time.time(),
    )


def config(run: str, pps: int = 2, eta: int = 1, **learner: Any) -> RunConfig:
    return RunConfig(
        name=run,
        learner={"prompts_per_step": pps, "max_staleness": eta, **learner},
        streams={"block_ms": 20, "read_count": 16},
        reward={"overlong": {"filter_truncated": True}},
    )


async def produce(redis: aioredis.Redis, run: str, *groups: ScoredGroup) -> list[str]:
    key = str(StreamSpec(run, SCORED))
    return [(await redis.xadd(key, {DATA_FIELD: g.to_bytes()})).decode() for g in groups]


MIXED = ["7", "3", "7", "1"]


async def test_collects_exactly_prompts_per_step_and_counts_drops(redis_client: aioredis.Redis, run_name: str) -> None:
    settled: list[tuple[list[str], list[str]]] = []
    assembler = BatchAssembler(config(run_name), redis_client, on_settled=lambda u, d: settled.append((u, d)))
    ids = await produce(
        redis_client,
        run_name,
        scored("a", MIXED, version=3),
        scored("b", ["3"] * 4, version=3, signal=False),
        scored("c", MIXED, version=1),  # 1 < 3 - eta: stale
        scored("d", MIXED, version=2),
        scored("e", MIXED, version=3),
    )
    batch = await assembler.next_batch(3)
    assert batch is not None
    assert batch.used_ids == ["a", "d"] and batch.entry_ids == ids[:4]  # "e" was not read ahead
    assert batch.dropped == {"stale": 1, "no_signal": 1, "duplicate": 0} and batch.returned_ids == ["b", "c"]
    assert settled == [([], ["b"]), ([], ["c"]), (["a", "d"], [])]
    assert len(batch.samples) == 8 and {s.group_id for s in batch.samples} == {"a", "d"}
    s = batch.stats
    assert (s["groups_consumed"], s["groups_used"], s["dropped_stale"], s["dropped_no_signal"]) == (4, 2, 1, 1)
    assert (s["staleness_mean"], s["staleness_max"], s["returned"]) == (0.5, 1.0, 2.0)
    assert s["tokens"] == sum(len(x.response_ids) for x in batch.samples)

    await produce(redis_client, run_name, scored("a", MIXED, version=3), scored("f", MIXED, version=4))
    second = await assembler.next_batch(4)
    assert second is not None and second.used_ids == ["e", "f"] and second.dropped["duplicate"] == 1
    assert second.returned_ids == []  # a duplicate holds no admission slot
    cumulative = second.stats["dropped_duplicate"], second.stats["dropped_stale"], second.stats["dropped_no_signal"]
    assert cumulative == (1, 1, 1) and second.stats["groups_consumed"] == 3


async def test_samples_carry_group_advantages_and_the_overlong_mask(
    redis_client: aioredis.Redis, run_name: str
) -> None:
    cfg = config(run_name, alpha=0.1, std_ddof=1)
    normal = scored("n", MIXED, version=2, finish=["stop", "length", "stop", "stop"])
    hard = scored("h", ["3"] * 4, version=2, realloc=[0, 0, 1, 0], action="reward", nlls=[0.4, 0.5, 0.9, 0.6])
    await produce(redis_client, run_name, normal, hard)
    batch = await BatchAssembler(cfg, redis_client).next_batch(2)
    assert batch is not None
    for group, samples in ((normal, batch.samples[:4]), (hard, batch.samples[4:])):
        expected = group_advantages(group.reward, group.realloc_reward, alpha=0.1, std_ddof=1)
        np.testing.assert_allclose([x.advantage for x in samples], expected)
        for x, r in zip(samples, group.rollout.responses, strict=True):
            assert x.group_id == group.rollout.task.prompt_id and x.version == r.version_first == 2
            np.testing.assert_array_equal(x.prompt_ids, group.rollout.prompt_token_ids)
            np.testing.assert_array_equal(x.response_ids, r.token_ids)
            np.testing.assert_array_equal(x.behaviour_logprobs, r.logprobs)
            assert x.temperature == group.rollout.task.sampling.temperature
    assert [x.trainable for x in batch.samples] == [True, False] + [True] * 6
    assert batch.samples[6].advantage > 0 > batch.samples[5].advantage  # the max-PPL wrong answer is rewarded
    assert batch.stats["tokens"] == sum(len(x.response_ids) for x in batch.samples) - len(batch.samples[1].response_ids)


async def test_restored_seen_ids_and_same_batch_copies_are_duplicates(
    redis_client: aioredis.Redis, run_name: str
) -> None:
    assembler = BatchAssembler(config(run_name), redis_client, seen_ids=["old@0"])
    await produce(redis_client, run_name, scored("old@0", MIXED), scored("x", MIXED), scored("x", MIXED))
    await produce(redis_client, run_name, scored("y", MIXED))
    batch = await assembler.next_batch(0)
    assert batch is not None and batch.used_ids == ["x", "y"] and batch.dropped["duplicate"] == 2
    assert len(batch.entry_ids) == 4 and batch.returned_ids == []


async def test_pending_entries_are_read_again_first_after_a_crash(redis_client: aioredis.Redis, run_name: str) -> None:
    cfg = config(run_name)
    ids = await produce(
        redis_client, run_name, scored("a", ["1"] * 4, signal=False), scored("b", MIXED), scored("c", MIXED)
    )
    crashed = await BatchAssembler(cfg, redis_client).next_batch(0)
    assert crashed is not None and crashed.entry_ids == ids
    later = await produce(redis_client, run_name, scored("d", MIXED), scored("e", MIXED))
    await redis_client.xdel(str(StreamSpec(run_name, SCORED)), ids[0])  # trimmed while pending

    resumed = BatchAssembler(cfg, redis_client)  # same consumer name, no checkpoint: nothing was acknowledged
    batch = await resumed.next_batch(0)
    assert batch is not None and batch.used_ids == ["b", "c"] and batch.entry_ids == ids
    assert batch.stats["groups_consumed"] == 2  # the deleted entry is only acknowledged
    assert await redis_client.xack(str(StreamSpec(run_name, SCORED)), "learner", *batch.entry_ids) == 3

    after_checkpoint = BatchAssembler(cfg, redis_client, seen_ids=batch.used_ids)
    nxt = await after_checkpoint.next_batch(0)
    assert nxt is not None and nxt.used_ids == ["d", "e"] and nxt.entry_ids == later


async def test_undecodable_pending_entries_are_dead_lettered(redis_client: aioredis.Redis, run_name: str) -> None:
    cfg = config(run_name)
    assembler = BatchAssembler(cfg, redis_client)
    await assembler.start()
    key = str(StreamSpec(run_name, SCORED))
    bad = (await redis_client.xadd(key, {DATA_FIELD: b"\x81\xa1x\x01"})).decode()
    await redis_client.xreadgroup("learner", "learner-0", {key: ">"})  # delivered, then the process died
    assert await BatchAssembler(cfg, redis_client).read_own_pending() == []
    assert await redis_client.xlen(str(StreamSpec(run_name, "deadletter"))) == 1
    assert bad not in [
        r["message_id"].decode() for r in await redis_client.xpending_range(key, "learner", "-", "+", 10)
    ]


async def test_stop_returns_none_and_loses_nothing(redis_client: aioredis.Redis, run_name: str) -> None:
    assembler = BatchAssembler(config(run_name), redis_client)
    first = await produce(redis_client, run_name, scored("a", MIXED))
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, stop.set)
    assert await assembler.next_batch(0, stop) is None
    second = await produce(redis_client, run_name, scored("b", MIXED))
    batch = await assembler.next_batch(0)
    assert batch is not None and batch.used_ids == ["a", "b"] and batch.entry_ids == first + second


async def test_state_through_a_batch_leaves_out_prefetched_ones(redis_client: aioredis.Redis, run_name: str) -> None:
    assembler = BatchAssembler(config(run_name, pps=1), redis_client, totals={"stale": 5})
    await produce(redis_client, run_name, scored("a", MIXED), scored("b", ["3"] * 4, signal=False), scored("c", MIXED))
    first, second = await assembler.next_batch(0), await assembler.next_batch(0)
    assert isinstance(first, StepBatch) and isinstance(second, StepBatch)
    state = assembler.state(through=first)
    assert state.seen_ids == ["a"] and state.totals["used"] == 1 and state.totals["stale"] == 5
    assert assembler.state().seen_ids == ["a", "c"] and assembler.state().totals["no_signal"] == 1
    assert AssemblerState.from_dict(state.to_dict()) == state
    with pytest.raises(ValueError):
        AssemblerState.from_dict({"seen_ids": "a"})


def test_batch_stats_kinds_quadrants_and_perplexities() -> None:
    normal = scored("n", ["7", "3"], nlls=[0.5, 0.7], version=1)  # ppl 1.65 (< tau 1.8: L) and 2.01 (H)
    hard = scored("h", ["3", "3"], nlls=[0.5, 0.5], action="reward", gate=False, realloc=[1, 0], version=1)
    s = batch_stats([normal, hard], [normal], version=3)
    assert (s["kind_normal"], s["kind_hard"], s["kind_easy"]) == (0.5, 0.5, 0.0)
    assert (s["realloc_reward"], s["realloc_penalty"], s["gate_open_ratio"]) == (1.0, 0.0, 0.5)
    assert (s["quad_CL"], s["quad_CH"], s["quad_EL"], s["quad_EH"]) == (0.25, 0.0, 0.5, 0.25)
    assert s["ppl_correct"] == pytest.approx(float(normal.perplexity[0]))
    assert s["ppl_wrong"] == pytest.approx(float(np.mean([normal.perplexity[1], *hard.perplexity])))
    assert (s["reward_mean"], s["accuracy"], s["staleness_mean"], s["tau"]) == (0.5, 0.5, 2.0, pytest.approx(1.8))
    empty = batch_stats([], [], version=0)
    assert math.isnan(empty["accuracy"]) and math.isnan(empty["ppl_correct"]) and empty["groups_consumed"] == 0


def sample(i: int, prompt: int, response: int, trainable: bool = True) -> Sample:
    rng = np.random.default_rng(i)
    return Sample(
        group_id=f"g{i}@0",
        prompt_ids=rng.integers(0, 50_000, prompt).astype(np.uint32),
        response_ids=rng.integers(0, 50_000, response).astype(np.uint32),
        behaviour_logprobs=-rng.random(response).astype(np.float32),
        advantage=float(rng.normal()),
        temperature=0.7,
        version=i,
        trainable=trainable,
    )


def test_samples_round_trip_through_bytes() -> None:
    samples = [sample(0, 5, 9), sample(1, 3, 0, trainable=False), sample(2, 7, 4)]
    decoded = decode_samples(encode_samples(samples))
    assert len(decoded) == 3
    for a, b in zip(samples, decoded, strict=True):
        fields = ("group_id", "advantage", "temperature", "version", "trainable")
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        for x, y in ((a.prompt_ids, b.prompt_ids), (a.response_ids, b.response_ids)):
            assert y.dtype == np.uint32 and np.array_equal(x, y)
        assert b.behaviour_logprobs.dtype == np.float32 and np.array_equal(a.behaviour_logprobs, b.behaviour_logprobs)
    assert decode_samples(encode_samples([])) == []
    good = encode_samples(samples)
    for broken in (good + b"\x00", good[:-3], b"\x80", b"\x81\xa1v\x01"):
        with pytest.raises(ProtocolError):
            decode_samples(broken)
    with pytest.raises(ValueError):
        Sample("g", np.zeros(2, np.uint32), np.zeros(3, np.uint32), np.zeros(2, np.float32), 0.0, 1.0, 0)


def test_micro_batches_fit_the_budget_and_keep_every_sample_once() -> None:
    rng = np.random.default_rng(0)
    samples = [sample(i, int(rng.integers(4, 40)), int(rng.integers(0, 90))) for i in range(60)]
    samples.append(sample(99, 300, 10))  # longer than the budget on its own
    batches = micro_batches(samples, token_budget=256)
    flat = [id(s) for b in batches for s in b]
    assert sorted(flat) == sorted(id(s) for s in samples)
    assert batches[0] == [samples[-1]]
    for b in batches[1:]:
        assert len(b) * max(s.length for s in b) <= 256
    lengths = [s.length for b in batches for s in b]
    assert lengths == sorted(lengths, reverse=True)  # similar lengths share a micro-batch
    assert micro_batches([], 64) == []
    with pytest.raises(ValueError):
        micro_batches(samples, 0)


# ------------------------------------------------------------------ groups sampled across a weight update


def across_update(group: ScoredGroup, first: int, last: int, switch: int = 3) -> ScoredGroup:
    """The group as if weights changed mid-generation: tokens before ``switch`` by ``first``, the rest by ``last``."""
    for r in group.rollout.responses:
        r.span_starts = np.array([0, switch], dtype="<u4")
        r.span_versions = np.array([first, last], dtype="<u4")
        r.span_weights = [f"v{first}:test", f"v{last}:test"]
    return group


async def test_a_group_sampled_across_an_update_is_as_stale_as_its_oldest_span(
    redis_client: aioredis.Redis, run_name: str
) -> None:
    assembler = BatchAssembler(config(run_name, pps=1, eta=2), redis_client)
    old, fresh = across_update(scored("old", MIXED), 1, 4), across_update(scored("fresh", MIXED), 2, 4)
    await produce(redis_client, run_name, old, fresh)
    batch = await assembler.next_batch(4)
    assert batch is not None
    assert (
        batch.used_ids == ["fresh"] and batch.dropped["stale"] == 1
    )  # "old" began at v1: 4 - 1 > eta, though v4 ended it
    assert batch.stats["staleness_max"] == 2.0  # measured from the oldest span
    for sample, response in zip(batch.samples, fresh.rollout.responses, strict=True):
        assert response.token_versions().tolist() == [2, 2, 2, 4, 4, 4, 4, 4]
        np.testing.assert_array_equal(sample.behaviour_logprobs, response.logprobs)  # as recorded, token by token


def test_truncated_is_weights_follow_the_behaviour_policy_of_each_token() -> None:
    # A response whose first 3 tokens came from the old weights and the rest from the new: when the proximal policy
    # is the new one, the new span's tokens get weight 1 and the old span's get exp(new - old), truncated at the cap.
    new = torch.full((1, 8), -1.0)
    behaviour = new.clone()
    behaviour[0, :3] = torch.tensor([-1.5, -0.5, -3.0])  # the old weights' log-probs of those tokens
    weights = truncated_is_weights(new, behaviour, cap=2.0)
    expected = [math.exp(0.5), math.exp(-0.5), 2.0, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(weights[0].numpy(), expected, rtol=1e-6)


async def test_groups_whose_weights_are_not_the_learners_are_dead_lettered_with_the_reason(
    redis_client: aioredis.Redis, run_name: str
) -> None:
    cfg = config(run_name, pps=1, eta=4)
    provenance = Provenance(cfg, redis_client)
    logprobs = np.linspace(-4, -0.1, 16, dtype=np.float32)
    await provenance.record(canary_reference(3, "v3:test", logprobs))
    honest = CanaryScore(3, "v3:test", logprobs + 1e-6, time.time() - 60)
    liar = CanaryScore(3, "v3:test", logprobs + 0.5, time.time() - 60)
    fields = {server_field("test", 3): encode_scorings([honest]), server_field("liar", 3): encode_scorings([liar])}
    await redis_client.hset(run_key(run_name, CANARIES), mapping=fields)
    forged = scored("forged", MIXED, version=3)
    for r in forged.rollout.responses:
        r.span_weights = ["v3:other"]
    lied = scored("lied", MIXED, version=3)
    lied.rollout.worker_id = "liar"
    settled: list[tuple[list[str], list[str]]] = []
    assembler = BatchAssembler(cfg, redis_client, on_settled=lambda u, d: settled.append((u, d)),
                               provenance=provenance)  # fmt: skip
    await produce(redis_client, run_name, forged, lied, scored("ok", MIXED, version=3))
    batch = await assembler.next_batch(3)
    assert batch is not None and batch.used_ids == ["ok"]
    assert batch.stats["dropped_provenance"] == 2 and settled[:2] == [([], ["forged"]), ([], ["lied"])]
    dead = [DeadLetter.from_bytes(f[DATA_FIELD.encode()]) for _, f in
            await redis_client.xrange(str(StreamSpec(run_name, DEADLETTER)))]  # fmt: skip
    reasons = {ScoredGroup.from_bytes(d.fields[DATA_FIELD]).rollout.task.prompt_id: d.error for d in dead}
    assert "sampled with weights v3:other" in reasons["forged"] and "canary mismatch" in reasons["lied"]
    assert await redis_client.hget(run_key(run_name, QUARANTINE), "liar") == b"3"
    assert await redis_client.hget(run_key(run_name, QUARANTINE), "test") is None


@pytest.mark.parametrize(("alpha", "used"), [(0.0, ["mixed"]), (0.1, ["reallocated", "mixed"])])
async def test_at_alpha_0_a_reallocated_group_is_dropped_as_dapo_drops_an_all_equal_one(
    redis_client: aioredis.Redis, run_name: str, alpha: float, used: list[str]
) -> None:
    # All wrong, with a reallocation reward on its least confident answer: signal for DiPO, none for DAPO.
    reallocated = scored("reallocated", ["3", "1", "2", "4"], realloc=[0.0, 1.0, 0.0, 0.0], action="reward")
    assert reallocated.signal
    assembler = BatchAssembler(config(run_name, pps=len(used), eta=4, alpha=alpha), redis_client)
    await produce(redis_client, run_name, reallocated, scored("mixed", MIXED))
    batch = await assembler.next_batch(0)
    assert batch is not None and batch.used_ids == used
    assert batch.dropped["no_signal"] == (1 if alpha == 0 else 0)
