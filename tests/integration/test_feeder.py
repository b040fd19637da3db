"""The prompt feeder against a real Redis: deterministic order, admission control, exactly-once release on resume."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from learner.data import DataItem, EpochOrder
from learner.feeder import FeederConflict, FeederState, PromptFeeder, prompt_seed
from reward_service.window import PplWindow
from services.config import RunConfig
from services.contracts import DEADLETTER, PROMPTS, ROLLOUT_GROUP, ROLLOUT_VERSIONS
from services.protocol import DeadLetter, PromptTask
from services.streams import DATA_FIELD, StreamSpec, run_key


def items(count: int = 10) -> list[DataItem]:
    return [
        DataItem(f"q{i}", "math", [{"role": "user", "content": f"What is {i} + 1?"}], str(i + 1), [], "chain_sum")
        for i in range(count)
    ]


def config(run: str, pps: int = 2, eta: int = 1, seed: int | None = 7, **learner: Any) -> RunConfig:
    return RunConfig(
        name=run,
        learner={"prompts_per_step": pps, "max_staleness": eta, **learner},
        sampling={"n": 3, "seed": seed, "temperature": 0.9, "max_new_tokens": 32},
        data={"seed": 5},
        redis={"backoff_base_s": 0.01, "retries": 3},
    )


async def released_tasks(redis: aioredis.Redis, run: str) -> list[PromptTask]:
    rows = await redis.xrange(str(StreamSpec(run, PROMPTS)))
    return [PromptTask.from_bytes(raw[DATA_FIELD.encode()]) for _, raw in rows]


async def test_releases_deterministic_tasks_in_epoch_order(redis_client: aioredis.Redis, run_name: str) -> None:
    data = items()
    feeder = PromptFeeder(config(run_name), redis_client, data)
    assert await feeder.top_up(0) == 4  # (0 + 1 + 1) * 2
    tasks = await released_tasks(redis_client, run_name)
    order = EpochOrder(len(data), 5)
    assert [t.prompt_id for t in tasks] == [f"{data[order.item_index(0, i)].item_id}@0" for i in range(4)]
    assert [(t.epoch, t.index, t.dispatch_version, t.n) for t in tasks] == [(0, i, 0, 3) for i in range(4)]
    first = data[order.item_index(0, 0)]
    assert tasks[0].messages == first.messages and tasks[0].ground_truth == first.ground_truth
    assert tasks[0].category == "chain_sum" and tasks[0].sampling.temperature == 0.9
    assert tasks[0].sampling.max_new_tokens == 32
    seeds = [t.sampling.seed for t in tasks]
    assert seeds == [prompt_seed(7, 0, i) for i in range(4)] and len(set(seeds)) == 4

    other_run = run_name + "b"
    again = PromptFeeder(config(other_run), redis_client, data)
    await again.top_up(0)
    assert [t.prompt_id for t in await released_tasks(redis_client, other_run)] == [t.prompt_id for t in tasks]

    unseeded_run = run_name + "c"
    await PromptFeeder(config(unseeded_run, seed=None), redis_client, data).top_up(0)
    assert all(t.sampling.seed is None for t in await released_tasks(redis_client, unseeded_run))


async def test_admission_follows_the_version_and_returned_slots(redis_client: aioredis.Redis, run_name: str) -> None:
    feeder = PromptFeeder(config(run_name, pps=2, eta=1), redis_client, items())
    assert await feeder.top_up(0) == 4
    assert await feeder.top_up(0) == 0
    assert await feeder.top_up(1) == 2 and feeder.outstanding == 6 == feeder.admission_bound(1)
    first, second, third = feeder.ledger()[:3]
    assert feeder.settle(dropped=[first, second]) == 2
    assert feeder.settle(dropped=[first, "never-released@0"]) == 0  # a second copy returns nothing
    assert feeder.settle(used=[third]) == 0 and third not in feeder.ledger()
    assert await feeder.top_up(1) == 2
    feeder.note_returned(1)
    assert await feeder.top_up(1) == 1
    assert feeder.released == 9 and feeder.returned == 3 and feeder.outstanding == feeder.admission_bound(1)
    assert len(await released_tasks(redis_client, run_name)) == 9
    assert [t.dispatch_version for t in await released_tasks(redis_client, run_name)] == [0] * 4 + [1] * 5
    with pytest.raises(ValueError):
        feeder.note_returned(-1)


async def test_epochs_wrap_with_ids_unique_per_epoch(redis_client: aioredis.Redis, run_name: str) -> None:
    data = items(3)
    feeder = PromptFeeder(config(run_name, pps=7, eta=0), redis_client, data)
    assert await feeder.top_up(0) == 7
    tasks = await released_tasks(redis_client, run_name)
    assert [(t.epoch, t.index) for t in tasks] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert len({t.prompt_id for t in tasks}) == 7
    for epoch in (0, 1):
        assert sorted(t.prompt_id for t in tasks if t.epoch == epoch) == [f"q{i}@{epoch}" for i in range(3)]
    assert feeder.state().epoch == 2 and feeder.state().index == 1


async def test_resume_neither_releases_twice_nor_skips(redis_client: aioredis.Redis, run_name: str) -> None:
    data = items()
    cfg = config(run_name, pps=2, eta=2)
    feeder = PromptFeeder(cfg, redis_client, data)
    assert await feeder.top_up(0) == 6
    checkpoint = json.loads(json.dumps(feeder.state().to_dict()))
    assert await feeder.top_up(2) == 4  # positions 6..9, released after the checkpoint, then a crash

    resumed = PromptFeeder(cfg, redis_client, data, FeederState.from_dict(checkpoint))
    assert resumed.released == 6
    assert await resumed.top_up(2) == 0  # 6..9 are in flight: nothing is admitted, nothing released again
    assert resumed.released == 10 and resumed.ledger() == feeder.ledger()
    assert await resumed.top_up(3) == 2
    ids = [t.prompt_id for t in await released_tasks(redis_client, run_name)]

    reference_run = run_name + "ref"
    await PromptFeeder(config(reference_run, pps=12, eta=0), redis_client, data).top_up(0)
    assert ids == [t.prompt_id for t in await released_tasks(redis_client, reference_run)]
    assert len(set(ids)) == 12 and ids[10].endswith("@1")  # 10 items: positions 10 and 11 start epoch 1
    assert resumed.state().released == 12 and (resumed.state().epoch, resumed.state().index) == (1, 2)


async def test_fresh_start_skips_what_a_crashed_run_released(redis_client: aioredis.Redis, run_name: str) -> None:
    cfg = config(run_name)
    await PromptFeeder(cfg, redis_client, items()).top_up(0)
    fresh = PromptFeeder(cfg, redis_client, items())  # no checkpoint was written before the crash
    assert await fresh.top_up(0) == 0 and fresh.released == 4 and len(fresh.ledger()) == 4
    assert len(await released_tasks(redis_client, run_name)) == 4


async def test_a_second_feeder_is_detected(redis_client: aioredis.Redis, run_name: str) -> None:
    cfg = config(run_name)
    first, second = PromptFeeder(cfg, redis_client, items()), PromptFeeder(cfg, redis_client, items())
    assert await first.top_up(0) == 4
    assert await second.top_up(1) == 2
    with pytest.raises(FeederConflict):
        await first.top_up(2)
    assert len(await released_tasks(redis_client, run_name)) == 6


async def test_a_retried_release_whose_reply_was_lost_appends_once(redis_client: aioredis.Redis, run_name: str) -> None:
    feeder = PromptFeeder(config(run_name), redis_client, items())
    real = feeder._script
    calls = 0

    async def reply_lost(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = await real(**kwargs)
        if calls == 1:
            raise rexc.ConnectionError("connection reset after the script ran")
        return result

    feeder._script = reply_lost  # type: ignore[assignment]
    assert await feeder.top_up(0) == 4
    assert calls == 2 and feeder.released == 4
    assert len(await released_tasks(redis_client, run_name)) == 4


async def test_dead_lettered_prompts_give_their_slot_back(redis_client: aioredis.Redis, run_name: str) -> None:
    feeder = PromptFeeder(config(run_name), redis_client, items())
    await feeder.top_up(0)
    task = (await released_tasks(redis_client, run_name))[1]
    letter = DeadLetter(
        str(StreamSpec(run_name, PROMPTS)), "1-0", "rollout", "w", "delivered 6 times", 6, {"d": task.to_bytes()}, 0.0
    )
    deadletter = str(StreamSpec(run_name, DEADLETTER))
    await redis_client.xadd(deadletter, {DATA_FIELD: letter.to_bytes()})
    await redis_client.xadd(deadletter, {DATA_FIELD: b"not msgpack"})
    assert await feeder.scan_dead_letters() == 1
    assert task.prompt_id not in feeder.ledger() and feeder.returned == 1
    assert await feeder.scan_dead_letters() == 0  # the cursor moved past both letters
    assert feeder.state().deadletter_cursor != "0-0"
    assert await feeder.top_up(0) == 1


def test_state_round_trips_and_rejects_malformed_input() -> None:
    state = FeederState(epoch=1, index=2, released=12, returned=3, ledger=[9, 11], dataset_size=10)
    assert FeederState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    with pytest.raises(ValueError, match="keys"):
        FeederState.from_dict({k: v for k, v in state.to_dict().items() if k != "ledger"})
    with pytest.raises(ValueError, match="position"):
        FeederState.from_dict(state.to_dict() | {"index": 3})
    with pytest.raises(ValueError, match="ledger"):
        FeederState.from_dict(state.to_dict() | {"ledger": [12]})
    with pytest.raises(ValueError, match="same data config"):
        PromptFeeder(config("r"), aioredis.Redis(), items(5), state)


async def test_dead_consumers_and_their_versions_are_removed(redis_client: aioredis.Redis, run_name: str) -> None:
    cfg = config(run_name)
    cfg.streams.consumer_expiry_s = 0.3
    feeder = PromptFeeder(cfg, redis_client, items())
    prompts = run_key(run_name, PROMPTS)
    await redis_client.xgroup_create(prompts, ROLLOUT_GROUP, id="0", mkstream=True)
    for i in range(3):
        await redis_client.xadd(prompts, {DATA_FIELD: f"p{i}".encode()})
    for consumer in ("killed", "busy"):  # both read one entry; only the killed one's was settled (claimed, acked)
        await redis_client.xreadgroup(ROLLOUT_GROUP, consumer, {prompts: ">"}, count=1)
    (entry,) = await redis_client.xpending_range(prompts, ROLLOUT_GROUP, "-", "+", 1, consumername="killed")
    await redis_client.xack(prompts, ROLLOUT_GROUP, entry["message_id"])
    versions = run_key(run_name, ROLLOUT_VERSIONS)
    await redis_client.hset(versions, mapping={"killed": "3", "busy": "3", "alive": "4"})
    await asyncio.sleep(0.4)
    await redis_client.xreadgroup(ROLLOUT_GROUP, "alive", {prompts: ">"}, count=1)  # reads, so it is not idle
    await redis_client.xack(prompts, ROLLOUT_GROUP, *[e["message_id"] for e in await redis_client.xpending_range(
        prompts, ROLLOUT_GROUP, "-", "+", 10, consumername="alive")])  # fmt: skip

    assert await feeder.remove_dead_consumers() == ["killed"]  # "busy" still holds a pending entry
    names = {c["name"].decode() for c in await redis_client.xinfo_consumers(prompts, ROLLOUT_GROUP)}
    assert names == {"busy", "alive"}
    assert await redis_client.hgetall(versions) == {b"busy": b"3", b"alive": b"4"}


async def test_the_refit_lock_is_released_only_by_its_holder(redis_client: aioredis.Redis, run_name: str) -> None:
    ours = PplWindow(
        redis_client, run_name, "math", capacity=64, min_window=8, refit_every_items=16, refit_every_s=60.0
    )
    await redis_client.set(ours.lock_key, "another replica's token", px=60_000)  # ours expired, theirs took over
    assert not await ours.release_lock()
    assert await redis_client.get(ours.lock_key) == b"another replica's token"
    await redis_client.set(ours.lock_key, ours._token, px=60_000)
    assert await ours.release_lock() and await redis_client.get(ours.lock_key) is None
