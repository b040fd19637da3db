"""Garbage written straight into the prompts, rollouts and scored streams, read by the real consumers.

Every consumer reads its stream through the same path as in production: the rollout worker (a tiny random Llama),
the reward worker (the real verifier pool) and the learner's BatchAssembler, against a real ``redis-server``.
Each stream gets the same corpus of undecodable entries (random bytes, wrong field names, a non-UTF-8 field name, an
empty payload, another stream's message, entries over the size limit) mixed with good entries, plus entries that
decode but that the consumer cannot serve (a group size that would exhaust memory, an empty stop string, a math task
with a list as its answer) and entries that decode and look odd but must be served (a temperature or nucleus that
rounds to zero in float32). Expected everywhere: each bad entry ends in ``deadletter`` with a reason and is
acknowledged, every good entry is processed, and the consumer keeps running. A hypothesis test writes arbitrary
field maps into ``scored`` and checks the same of the assembler.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, even by accident

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis
import torch
from factories import math_group, math_task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factories import DelegatingBackend, save_tiny_llama

from learner.batch import BatchAssembler
from reward_service.verify import Verifiers
from reward_service.worker import RewardWorker
from rollout_server.backends import PromptGroup
from rollout_server.backends.hf import HFBackend
from rollout_server.worker import MAX_GROUP_SIZE, RolloutWorker
from services.config import RewardConfig, RunConfig, load_config
from services.contracts import DEADLETTER, ROLLOUTS, SCORED
from services.protocol import SCHEMA_VERSION, DeadLetter, PromptTask, RolloutGroup, Sampling, ScoredGroup
from services.streams import DATA_FIELD, StreamSpec, connect

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)

MAX_PAYLOAD = 64 * 1024
"""``streams.max_payload_bytes`` of these tests: entries larger than this are dead-lettered without being unpacked."""

Fields = dict[Any, bytes]


def config(run: str, url: str, *extra: str) -> RunConfig:
    return load_config(
        None,
        [f"name={run}", f"redis.url={url}", "streams.block_ms=50", "streams.read_count=64",
         f"streams.max_payload_bytes={MAX_PAYLOAD}", *extra],
        environ={},
    )  # fmt: skip


def garbage(other_stream_message: bytes, too_big_message: bytes) -> list[tuple[Fields, str]]:
    """Undecodable entries for any stream, each with a substring its dead letter's reason must contain."""
    rng = random.Random(20240611)
    # random bytes fail in many ways (bad msgpack, an extension type, not a map...): any stated reason will do
    entries: list[tuple[Fields, str]] = [({DATA_FIELD: rng.randbytes(size)}, "") for size in (1, 7, 64, 333, 4096)]
    entries += [
        ({DATA_FIELD: b""}, "message:"),
        ({DATA_FIELD: b"\x93garbage"}, "message:"),
        ({DATA_FIELD: msgpack.packb({"v": SCHEMA_VERSION + 1, "t": "prompt", "x": [[[[[]]]]]})}, "schema version"),
        ({DATA_FIELD: msgpack.packb([1] * 10) * 3}, "message:"),  # trailing data
        ({DATA_FIELD: b"\x91" * 5000 + b"\xc0"}, "message:"),  # nesting deeper than msgpack's stack
        ({DATA_FIELD: other_stream_message}, "type tag"),
        ({"data": other_stream_message}, "no 'd' field"),
        ({"D": other_stream_message}, "no 'd' field"),
        ({b"\xff\xfe": b"\x00"}, "no 'd' field"),  # a field name that is not UTF-8
        ({DATA_FIELD: rng.randbytes(MAX_PAYLOAD + 1)}, "exceeds the limit"),
        ({DATA_FIELD: too_big_message}, "exceeds the limit"),
    ]
    return entries


async def write(redis: aioredis.Redis, key: str, entries: list[Fields]) -> list[str]:
    """XADD each field map as it is, bypassing every producer-side check; returns the entry ids."""
    return [(await redis.xadd(key, fields)).decode() for fields in entries]  # type: ignore[arg-type]


async def dead_letters(redis: aioredis.Redis, run: str) -> dict[str, DeadLetter]:
    """The run's dead letters by the entry id they came from."""
    rows = await redis.xrange(str(StreamSpec(run, DEADLETTER)))
    letters = [DeadLetter.from_bytes(fields[b"d"]) for _, fields in rows]
    return {letter.entry_id: letter for letter in letters}


async def pending(redis: aioredis.Redis, key: str, group: str) -> int:
    return int((await redis.xpending(key, group))["pending"])


def check_dead(letters: dict[str, DeadLetter], expected: dict[str, str], source: str) -> None:
    """Every expected entry id was dead-lettered from ``source`` with a reason containing the expected text."""
    assert set(letters) == set(expected), f"dead-lettered {sorted(letters)}, expected {sorted(expected)}"
    for entry_id, reason in expected.items():
        letter = letters[entry_id]
        assert letter.source_stream == source
        assert letter.error and reason in letter.error, (entry_id, reason, letter.error)


# ------------------------------------------------------------------------------------------------ prompts stream


class GuardedBackend(DelegatingBackend):
    """The real tiny-model backend behind a guard: a group size that reaches it would be the memory bug itself."""

    def __init__(self, inner: HFBackend) -> None:
        super().__init__(inner)
        self.largest_n = 0

    def submit(self, prompt_ids: Any, n: int, sampling: Sampling) -> Future[PromptGroup]:
        self.largest_n = max(self.largest_n, n)
        assert n <= MAX_GROUP_SIZE, f"the worker handed n={n} to the backend"
        return self.inner.submit(prompt_ids, n, sampling)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> GuardedBackend:
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), intermediate_size=64, max_positions=256)
    return GuardedBackend(HFBackend(folder))


def prompt(prompt_id: str, **sampling: Any) -> PromptTask:
    params = {"max_new_tokens": 4} | sampling
    n = params.pop("n", 2)
    return PromptTask(
        prompt_id=prompt_id, task_kind="math", messages=[{"role": "user", "content": "What is 3 + 4?"}],
        ground_truth="7", n=n, sampling=Sampling(**params), created_at=time.time(),
    )  # fmt: skip


async def test_rollout_worker_dead_letters_garbage_and_answers_the_rest(
    backend: GuardedBackend, redis_client: aioredis.Redis, redis_url: str, run_name: str
) -> None:
    cfg = config(run_name, redis_url, "rollout.max_inflight_groups=64")
    worker = RolloutWorker(cfg, backend, redis_client, consumer="hostile")
    await worker.prompts.ensure_group()
    key = worker.prompts.key
    huge = prompt("huge", max_new_tokens=4)
    huge.messages = [{"role": "user", "content": "x" * MAX_PAYLOAD}]
    corpus = garbage(math_group("r", ["7", "3"]).to_bytes(), huge.to_bytes())
    # They decode, and say things no backend can do: each is refused alone, with the reason, and nothing else fails.
    refused = {
        "many": (prompt("many", n=2**40), "largest group"),
        "long": (prompt("long", max_new_tokens=2**62), "context"),
    }
    # They decode, look odd, and are fine: tiny temperatures and nuclei are sampled (greedily) without NaN.
    odd = {
        "tiny-temperature": prompt("tiny-temperature", temperature=1e-300),
        "tiny-top-p": prompt("tiny-top-p", top_p=1e-300),
        "huge-top-k": prompt("huge-top-k", top_k=2**62),
        "negative-seed": prompt("negative-seed", seed=-(2**63)),
    }
    good = [prompt(f"good{i}") for i in range(3)]
    # A producer that builds its messages by hand can write what the sampling record refuses to be built with.
    raw = msgpack.unpackb(prompt("empty-stop").to_bytes())
    raw["sampling"]["stop"] = [""]
    corpus.append(({DATA_FIELD: msgpack.packb(raw)}, "stop strings must be non-empty"))
    bad_ids = await write(redis_client, key, [fields for fields, _ in corpus])
    refused_ids = await write(redis_client, key, [{DATA_FIELD: t.to_bytes()} for t, _ in refused.values()])
    await write(redis_client, key, [{DATA_FIELD: t.to_bytes()} for t in [*odd.values(), *good]])

    produced = 0
    for _ in range(5):  # a crash in step() fails the test; a worker that lives on drains the stream
        produced += await worker.step(claim=False)
        if await pending(redis_client, key, "rollout") == 0 and produced == len(odd) + len(good):
            break
    expected = {i: reason for i, (_, reason) in zip(bad_ids, corpus, strict=True)}
    expected |= {i: reason for i, (_, reason) in zip(refused_ids, refused.values(), strict=True)}
    check_dead(await dead_letters(redis_client, run_name), expected, key)
    assert await pending(redis_client, key, "rollout") == 0
    assert backend.largest_n <= 2

    rows = await redis_client.xrange(str(StreamSpec(run_name, ROLLOUTS)))
    groups = {g.task.prompt_id: g for g in (RolloutGroup.from_bytes(f[b"d"]) for _, f in rows)}
    assert sorted(groups) == sorted([*odd, *(t.prompt_id for t in good)])
    for group in groups.values():
        for response in group.responses:
            assert len(response.token_ids) >= 1 and np.isfinite(response.logprobs).all()
            assert (response.logprobs <= 0).all()


# ------------------------------------------------------------------------------------------------ rollouts stream


@pytest.fixture(scope="module")
def verifiers() -> Iterator[Verifiers]:
    pool = Verifiers(RewardConfig(verifier_workers=1, verify_timeout_s=2.0))
    assert pool.wait_ready(120), "math workers did not warm up"
    yield pool
    pool.close()


def call_group(prompt_id: str, ground_truth: Any, category: str = "simple_python") -> RolloutGroup:
    """A function-call group whose task carries ``ground_truth`` and ``category`` as given."""
    group = math_group(prompt_id, ["1", "2"])
    group.task.task_kind = "function_call"
    group.task.ground_truth = ground_truth
    group.task.category = category
    group.task.tools = [{"name": "f", "parameters": {"type": "dict", "properties": {}}}]
    for response in group.responses:
        response.text = "f()"  # a well-formed call, so the check reaches the ground truth
    return group


async def test_reward_worker_dead_letters_garbage_and_scores_the_rest(
    verifiers: Verifiers, redis_client: aioredis.Redis, redis_url: str, run_name: str
) -> None:
    cfg = config(run_name, redis_url)
    worker = RewardWorker(cfg, redis_client, verifiers, consumer="hostile")
    await worker.rollouts.ensure_group()
    key = worker.rollouts.key
    huge = math_group("huge", ["7", "3"])
    huge.responses[0].text = "\\boxed{" * (MAX_PAYLOAD // 7)
    corpus = garbage(math_task("p").to_bytes(), huge.to_bytes())
    list_truth = math_group("list-truth", ["7", "3"])
    list_truth.task.ground_truth = ["7"]
    unscorable = {
        "list-truth": (list_truth, "cannot score"),  # a math task whose answer is not a string
        "bad-json-truth": (call_group("bad-json-truth", "{not json"), "cannot score"),
    }
    # They decode and are scored: hostile response texts, and truths the verifier can only call an error.
    scorable = [
        math_group("hostile-texts", ["7", "7"]),
        call_group("java", [{"f": {}}], category="java"),
        call_group("truth-not-calls", [1, 2, 3]),
    ]
    hostile = scorable[0]
    hostile.responses[0].text = "\\boxed{" + "9^{" * 60 + "9" + "}" * 60 + "}"
    hostile.responses[1].text = "\\boxed{__import__('os').system('false')} " * 1000
    good = [math_group(f"good{i}", ["7", "3", "7", "1"]) for i in range(3)]
    bad_ids = await write(redis_client, key, [fields for fields, _ in corpus])
    unscorable_ids = await write(redis_client, key, [{DATA_FIELD: g.to_bytes()} for g, _ in unscorable.values()])
    await write(redis_client, key, [{DATA_FIELD: g.to_bytes()} for g in [*scorable, *good]])

    done = 0
    for _ in range(5):
        done += await worker.step(claim=False)
        if await pending(redis_client, key, "reward") == 0 and worker.groups_done == len(scorable) + len(good):
            break
    expected = {i: reason for i, (_, reason) in zip(bad_ids, corpus, strict=True)}
    expected |= {i: reason for i, (_, reason) in zip(unscorable_ids, unscorable.values(), strict=True)}
    check_dead(await dead_letters(redis_client, run_name), expected, key)
    assert await pending(redis_client, key, "reward") == 0

    rows = await redis_client.xrange(str(StreamSpec(run_name, SCORED)))
    scored = {s.rollout.task.prompt_id: s for s in (ScoredGroup.from_bytes(f[b"d"]) for _, f in rows)}
    assert sorted(scored) == sorted([g.task.prompt_id for g in [*scorable, *good]])
    for prompt_id in ("good0", "good1", "good2"):
        assert scored[prompt_id].status == ["correct", "wrong", "correct", "wrong"]
    assert scored["java"].status == ["error", "error"] and scored["truth-not-calls"].status == ["error", "error"]
    assert all(status != "correct" for status in scored["hostile-texts"].status)


# ------------------------------------------------------------------------------------------------ scored stream


def scored_group(prompt_id: str, answers: list[str], version: int = 0) -> ScoredGroup:
    """A scored math group (gold 7) as the reward service would write it."""
    rollout = math_group(prompt_id, answers, version=version)
    correct = np.array([a == "7" for a in answers], dtype=np.uint8)
    ppl = np.array([float(np.exp(-r.logprobs.mean())) for r in rollout.responses], dtype=np.float32)
    return ScoredGroup(
        rollout=rollout, status=["correct" if c else "wrong" for c in correct], correct=correct,
        reward=correct.astype(np.float32), realloc_reward=np.zeros(len(answers), np.float32), perplexity=ppl,
        group_kind="normal", action="none", tau=1.5, gate_open=True, fit_window=32, fit_at=0.0,
        signal=bool(0 < correct.sum() < len(answers)), scorer_id="test", scored_at=time.time(),
    )  # fmt: skip


async def test_batch_assembler_dead_letters_garbage_and_batches_the_rest(
    redis_client: aioredis.Redis, redis_url: str, run_name: str
) -> None:
    cfg = config(run_name, redis_url, "learner.prompts_per_step=3")
    assembler = BatchAssembler(cfg, redis_client, consumer="learner-0")
    key = assembler.client.key
    huge = scored_group("huge", ["7", "3"])
    huge.rollout.responses[0].text = "x" * MAX_PAYLOAD
    corpus = garbage(math_group("r", ["7", "3"]).to_bytes(), huge.to_bytes())
    good = [scored_group(f"good{i}", ["7", "3"]) for i in range(3)]
    bad_ids = await write(redis_client, key, [fields for fields, _ in corpus[:8]])
    good_ids = await write(redis_client, key, [{DATA_FIELD: good[0].to_bytes()}])
    bad_ids += await write(redis_client, key, [fields for fields, _ in corpus[8:]])
    # A good entry with an extra field whose name is not UTF-8: used, and still replayable after a restart.
    good_ids += await write(redis_client, key, [{DATA_FIELD: good[1].to_bytes(), b"\xc3\x28": b"?"}])
    good_ids += await write(redis_client, key, [{DATA_FIELD: good[2].to_bytes()}])

    batch = await asyncio.wait_for(assembler.next_batch(0), 60)
    assert batch is not None and batch.used_ids == ["good0", "good1", "good2"]
    assert batch.entry_ids == good_ids  # garbage never reaches a batch
    expected = {i: reason for i, (_, reason) in zip(bad_ids, corpus, strict=True)}
    check_dead(await dead_letters(redis_client, run_name), expected, key)
    assert await pending(redis_client, key, "learner") == len(good_ids)  # acknowledged only after a checkpoint

    # A restarted learner (same consumer name) replays what it had not acknowledged, odd field name included.
    restarted = BatchAssembler(cfg, redis_client, consumer="learner-0")
    replay = await asyncio.wait_for(restarted.next_batch(0), 60)
    assert replay is not None and replay.entry_ids == good_ids and replay.used_ids == batch.used_ids


# ------------------------------------------------------------------------------------------------ fuzzed field maps

field_maps = st.dictionaries(
    st.one_of(st.binary(max_size=6), st.sampled_from([b"d", b"D", b"data", b"\xff"])),
    st.binary(max_size=600),
    min_size=1,
    max_size=3,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(field_maps, min_size=1, max_size=6))
def test_fuzzed_field_maps_in_scored_are_dead_lettered(redis_url: str, entries: list[dict[bytes, bytes]]) -> None:
    """Arbitrary field maps (random names and bytes) XADDed into ``scored``: all dead-lettered, none batched."""
    run = f"f{uuid.uuid4().hex[:12]}"
    good = scored_group("good", ["7", "3"])

    async def scenario() -> None:
        redis = connect(redis_url, timeout_s=5.0)
        try:
            assembler = BatchAssembler(config(run, redis_url, "learner.prompts_per_step=1"), redis)
            key = assembler.client.key
            bad_ids = await write(redis, key, entries)
            good_ids = await write(redis, key, [{DATA_FIELD: good.to_bytes()}])
            batch = await asyncio.wait_for(assembler.next_batch(0), 30)
            assert batch is not None and batch.entry_ids == good_ids
            letters = await dead_letters(redis, run)
            assert set(letters) == set(bad_ids)
            assert all(letter.error for letter in letters.values())
            for entry_id, fields in zip(bad_ids, entries, strict=True):
                kept = set(letters[entry_id].fields.values())
                assert kept <= set(fields.values()) and kept  # the raw values travel with the dead letter
        finally:
            await redis.aclose()

    asyncio.run(scenario())
