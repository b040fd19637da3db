"""The rollout server against a real Redis: in-process worker semantics, and servers as processes (SIGKILL, weight
broadcast from an in-test learner, a late joiner that starts from the published checkpoint, SIGTERM)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch
import yaml
from model_factories import DelegatingBackend
from transformers import LlamaConfig, LlamaForCausalLM

from learner.weight_sync import WeightBroadcaster, redis_hash_publisher
from rollout_server.backends import Backend, PromptGroup
from rollout_server.backends.hf import HFBackend
from rollout_server.worker import RolloutWorker
from services.config import load_config
from services.contracts import DEADLETTER, POLICY, PROMPTS, ROLLOUT_GROUP, ROLLOUT_VERSIONS, ROLLOUTS
from services.modeling.loading import DEFAULT_MODEL, load_tokenizer
from services.protocol import DeadLetter, PromptTask, RolloutGroup, Sampling
from services.streams import StreamClient, StreamSpec, connect_sync, run_key

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama with the default model's tokenizer (a decode step takes a few ms on one thread)."""
    return save_rollout_llama(tmp_path_factory.mktemp("rollout-llama"))


def save_rollout_llama(folder: Path) -> Path:
    """Write the small random Llama (seeded: the same weights every time) with the default tokenizer to ``folder``."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def task(i: int, *, n: int = 2, max_new_tokens: int = 8, **sampling: Any) -> PromptTask:
    return PromptTask(
        prompt_id=f"p{i}", task_kind="math", messages=[{"role": "user", "content": f"What is {i} + {i}?"}],
        ground_truth=str(2 * i), n=n, sampling=Sampling(max_new_tokens=max_new_tokens, **sampling),
        created_at=time.time(),
    )  # fmt: skip


async def rollouts_of(redis: aioredis.Redis, run: str) -> list[RolloutGroup]:
    return [RolloutGroup.from_bytes(f[b"d"]) for _, f in await redis.xrange(str(StreamSpec(run, ROLLOUTS)))]


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        await asyncio.sleep(0.05)


def check_group(group: RolloutGroup, versions: set[int]) -> None:
    assert len(group.responses) == group.task.n
    assert len(group.prompt_token_ids) > 0
    for r in group.responses:
        assert 1 <= len(r.token_ids) == len(r.logprobs) <= group.task.sampling.max_new_tokens
        assert {int(v) for v in r.span_versions} <= versions
        assert (r.logprobs <= 0).all()


# ------------------------------------------------------------------ in-process worker


class SpyBackend(DelegatingBackend):
    """Delegates to a real backend, recording each submitted group; can hold new groups until released."""

    def __init__(self, inner: HFBackend) -> None:
        super().__init__(inner)
        self.calls: list[tuple[int, Sampling]] = []
        self.inflight, self.most_inflight = 0, 0
        self.release = threading.Event()
        self.release.set()
        self.held: list[Future[PromptGroup]] = []

    def submit(self, prompt_ids: Any, n: int, sampling: Sampling) -> Future[PromptGroup]:
        self.calls.append((n, sampling))
        if not self.release.is_set():
            held: Future[PromptGroup] = Future()
            self.held.append(held)
            return held
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        future = self.inner.submit(prompt_ids, n, sampling)
        future.add_done_callback(lambda _: self._done())
        return future

    def _done(self) -> None:
        self.inflight -= 1


@pytest.fixture(scope="module")
def hf_backend(model_dir: Path) -> HFBackend:
    return HFBackend(model_dir)


def _worker(run: str, url: str, backend: Backend, redis: aioredis.Redis, inflight: int = 8) -> RolloutWorker:
    cfg = load_config(None, [f"name={run}", f"redis.url={url}", f"rollout.max_inflight_groups={inflight}",
                             "streams.block_ms=100"], environ={})  # fmt: skip
    return RolloutWorker(cfg, backend, redis, consumer="inproc")


async def _drive(worker: RolloutWorker, until: Callable[[], Awaitable[bool]], timeout_s: float = 60) -> None:
    """Run worker steps until ``until()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not await until():
        assert time.monotonic() < deadline, "the worker did not get there in time"
        await worker.step(claim=False)


async def test_groups_are_written_as_they_finish_refused_tasks_dead_lettered_and_duplicates_dropped(
    hf_backend: HFBackend, redis_client: aioredis.Redis, redis_url: str, run_name: str
) -> None:
    spy = SpyBackend(hf_backend)
    worker = _worker(run_name, redis_url, spy, redis_client)
    prompts = worker.prompts
    await prompts.ensure_group()
    tasks = [task(0), task(1), task(2, temperature=0.7), task(3, n=3), task(4, max_new_tokens=400), task(1)]
    await prompts.produce_many([t.to_bytes() for t in tasks])

    async def settled() -> bool:
        return worker.inflight == 0 and (await prompts.info()).pending == 0 and len(spy.calls) == 5

    await _drive(worker, settled)
    groups = await rollouts_of(redis_client, run_name)
    assert sorted(g.task.prompt_id for g in groups) == ["p0", "p1", "p2", "p3"]  # the duplicate p1 was not redone
    assert sorted(n for n, _ in spy.calls) == [2, 2, 2, 2, 3]  # each group submitted once, with its own sampling
    for g in groups:
        check_group(g, {0})
    [dead] = [
        DeadLetter.from_bytes(f[b"d"]) for _, f in await redis_client.xrange(str(StreamSpec(run_name, DEADLETTER)))
    ]
    assert "context" in dead.error and PromptTask.from_bytes(dead.fields["d"]).prompt_id == "p4"
    sample = worker.metrics.component.registry.get_sample_value
    assert sample("dipo_rollout_groups_total") == 4
    assert sample("dipo_rollout_tokens_total") == sum(len(r.token_ids) for g in groups for r in g.responses)


async def test_the_next_prompt_is_taken_as_a_group_finishes_never_after_a_batch(
    model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str
) -> None:
    backend = HFBackend(model_dir, eos_token_ids=[])  # every sample runs to its max_new_tokens
    spy = SpyBackend(backend)
    try:
        worker = _worker(run_name, redis_url, spy, redis_client, inflight=2)
        await worker.prompts.ensure_group()
        tasks = [task(0, max_new_tokens=120), *(task(i, max_new_tokens=3) for i in range(1, 6))]
        await worker.prompts.produce_many([t.to_bytes() for t in tasks])

        async def written(count: int) -> bool:
            return await redis_client.xlen(str(StreamSpec(run_name, ROLLOUTS))) >= count

        await _drive(worker, lambda: written(6))
    finally:
        backend.close()
    order = [g.task.prompt_id for g in await rollouts_of(redis_client, run_name)]
    # The long group held one of the two slots the whole time; the short ones went through the other one by one.
    assert order[-1] == "p0" and sorted(order[:-1]) == [f"p{i}" for i in range(1, 6)]
    assert spy.most_inflight == 2


async def test_cancelled_groups_are_abandoned_and_stay_pending(
    hf_backend: HFBackend, redis_client: aioredis.Redis, redis_url: str, run_name: str
) -> None:
    spy = SpyBackend(hf_backend)
    spy.release.clear()
    worker = _worker(run_name, redis_url, spy, redis_client)
    await worker.prompts.ensure_group()
    await worker.prompts.produce_many([task(i).to_bytes() for i in range(3)])
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await wait_for("three groups in flight", lambda: asyncio.sleep(0, len(spy.held) == 3), 30)
    stop.set()
    running.cancel()  # what shutdown does once the grace period is over
    with pytest.raises(asyncio.CancelledError):
        await running
    assert all(future.cancelled() for future in spy.held)  # the engine was told to drop them
    assert worker.metrics.component.registry.get_sample_value("dipo_rollout_abandoned_total") == 3
    assert len(await worker.prompts.pending_ids()) == 3
    assert await redis_client.xlen(str(StreamSpec(run_name, ROLLOUTS))) == 0


# ------------------------------------------------------------------ servers as processes


def write_config(tmp_path: Path, run: str, url: str, model: Path, name: str) -> Path:
    cfg = {
        "name": run,
        "redis": {"url": url},
        "streams": {"visibility_timeout_s": 3.0, "block_ms": 200},
        "model": {"name_or_path": str(model)},
        "rollout": {"max_inflight_groups": 4, "torch_threads": 1, "weight_sync_timeout_s": 20.0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_server(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rollout_server", "--config", str(config)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def consumer_of(proc: subprocess.Popen[bytes]) -> str:
    return f"rollout-{os.uname().nodename}-{proc.pid}"


def stop_all(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def shifted_weights(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in model.named_parameters()}


async def test_two_servers_one_killed_answer_every_prompt_once_and_follow_the_weights(
    model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    sync_redis = connect_sync(redis_url)
    policy_key, versions_key = run_key(run_name, POLICY), run_key(run_name, ROLLOUT_VERSIONS)
    sync_redis.hset(policy_key, mapping={"version": "0", "status": "running"})
    learner = WeightBroadcaster(timeout_s=20.0, publish=redis_hash_publisher(sync_redis, policy_key))
    prompts = StreamClient(redis_client, StreamSpec(run_name, PROMPTS), ROLLOUT_GROUP, "test")
    await prompts.ensure_group()
    await prompts.produce_many([task(i).to_bytes() for i in range(8)])
    config = write_config(tmp_path, run_name, redis_url, model_dir, "server")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = start_server(config, logs[0]), start_server(config, logs[1])
    try:

        async def both_at(version: str) -> bool:
            got = await redis_client.hgetall(versions_key)
            return [got.get(consumer_of(p).encode()) for p in (a, b)] == [version.encode()] * 2

        await wait_for("both servers to publish v0", lambda: both_at("0"), 120, logs)
        assert await asyncio.to_thread(learner.wait_for_receivers, 2, 60) == 2
        report = await asyncio.to_thread(learner.broadcast, list(shifted_weights(model_dir, 1).items()), 1)
        assert sorted(report.receivers) and not report.dropped, report
        assert len(report.receivers) == 2
        await wait_for("both servers to publish v1", lambda: both_at("1"), 10, logs)
        sync_redis.hset(policy_key, "version", "1")
        await prompts.produce_many([task(i).to_bytes() for i in range(8, 48)])

        async def a_busy() -> bool:
            held = await prompts.pending_ids(consumer_of(a))
            return bool(held) and any(g.worker_id == consumer_of(a) for g in await rollouts_of(redis_client, run_name))

        await wait_for("server a to hold work after producing some", a_busy, 60, logs)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        orphaned = await prompts.pending_ids(consumer_of(a))

        async def all_answered() -> bool:
            return await redis_client.xlen(str(StreamSpec(run_name, ROLLOUTS))) >= 48

        await wait_for("every prompt to be answered", all_answered, 90, logs)
        groups = await rollouts_of(redis_client, run_name)
        pending = (await prompts.info()).pending
        b_version = (await asyncio.to_thread(sync_redis.hgetall, versions_key)).get(consumer_of(b).encode())
    finally:
        stop_all(a, b)
        learner.close()
        sync_redis.close()
    assert Counter(g.task.prompt_id for g in groups) == Counter(f"p{i}" for i in range(48))  # each exactly once
    for g in groups:
        check_group(g, {0, 1})
    assert pending == 0 and b_version == b"1"
    assert orphaned, "server a was killed without prompts in flight"
    ids = {entry.decode(): i for i, (entry, _) in enumerate(await redis_client.xrange(str(prompts.spec)))}
    answered_by = {g.task.prompt_id: g.worker_id for g in groups}
    assert {answered_by[f"p{ids[o]}"] for o in orphaned} == {consumer_of(b)}  # the survivor claimed a's batch
    assert {g.worker_id for g in groups} == {consumer_of(a), consumer_of(b)}
    assert any(g.responses[0].version_first == 1 for g in groups if g.worker_id == consumer_of(b))


async def test_late_server_starts_from_the_published_checkpoint(
    model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "step-000007"
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(shifted_weights(model_dir, 7), strict=False)
    model.save_pretrained(checkpoint)
    policy_key, versions_key = run_key(run_name, POLICY), run_key(run_name, ROLLOUT_VERSIONS)
    await redis_client.hset(policy_key, mapping={"version": "7", "status": "running", "checkpoint": str(checkpoint),
                                                 "checkpoint_version": "7"})  # fmt: skip
    prompts = StreamClient(redis_client, StreamSpec(run_name, PROMPTS), ROLLOUT_GROUP, "test")
    await prompts.ensure_group()
    log = tmp_path / "c.log"
    c = start_server(write_config(tmp_path, run_name, redis_url, model_dir, "late"), log)
    try:

        async def published() -> bool:
            return await redis_client.hget(versions_key, consumer_of(c)) is not None

        await wait_for("the late server to publish its version", published, 120, [log])
        assert await redis_client.hget(versions_key, consumer_of(c)) == b"7"  # the first version it publishes
        await prompts.produce_many([task(i).to_bytes() for i in range(3)])

        async def answered() -> bool:
            return await redis_client.xlen(str(StreamSpec(run_name, ROLLOUTS))) >= 3

        await wait_for("the late server's groups", answered, 60, [log])
        c.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its graceful shutdown, so a clean stop ends with -SIGTERM
        assert c.wait(40) in (0, -signal.SIGTERM)
        assert "stopped after 3 groups" in log.read_text()
    finally:
        stop_all(c)
    for g in await rollouts_of(redis_client, run_name):
        check_group(g, {7})
    assert await redis_client.hget(versions_key, consumer_of(c)) is None  # withdrawn on shutdown
