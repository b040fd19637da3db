"""Outages: Redis unreachable while the pipeline runs, a rollout server frozen inside a weight broadcast, and a
verification that hangs.

1. Redis goes away. A rollout worker (the HF backend on a tiny random Llama, with its weight-sync thread), a reward
   worker (real math verifier pool) and the learner's Redis side (the prompt feeder and the batch assembler) run
   in this process against a private ``redis-server`` with ``appendfsync always``. The server is stopped for
   ``outage_s`` seconds and started again on the same port, reloading its append-only file. Every component must
   still be running afterwards (none died or gave up), the flow must resume, and every prompt the feeder released
   must reach the learner (or the dead-letter stream, with its reason): nothing is lost. 5 s is shorter than one
   Redis call's own retry budget (about 8 to 16 s with the default ``redis`` settings); 30 s (``slow``) is longer,
   so it exercises what the long-lived loops do once a call has run out of retries.
2. A rollout server (``python -m rollout_server``) is SIGSTOPped inside a weight-sync round, after the round's
   group formed and before the first bucket went out. The learner's collective times out, the server is dropped;
   after SIGCONT it notices, loads the checkpoint the learner published meanwhile, joins again and receives the
   later rounds: its weights then generate exactly what the learner's weights generate.
3. A verification hangs. One response's answer is a power tower that sympy would evaluate for ever (the worker's
   soft timer ends it), then the only verifier process is frozen so that the parent's hard deadline has to kill
   and replace it. Both items end as ``timeout`` in their scored groups and the groups after them are scored.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import contextlib
import functools
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import torch
import yaml
from factories import math_group
from model_factories import save_tiny_llama
from transformers import LlamaForCausalLM

from learner.batch import BatchAssembler
from learner.data import DataItem
from learner.feeder import PromptFeeder
from learner.weight_sync import BroadcastReport, WeightBroadcaster, redis_hash_publisher
from reward_service.verify import Verifiers
from reward_service.worker import RewardWorker
from rollout_server.backends.base import WeightsTag
from rollout_server.backends.hf import HFBackend
from rollout_server.metrics import RolloutMetrics
from rollout_server.sync import PolicyWeights, WeightSync
from rollout_server.worker import RolloutWorker
from runner.redis_server import LocalRedis
from services.config import RewardConfig, RunConfig
from services.contracts import DEADLETTER, POLICY, ROLLOUT_VERSIONS, ROLLOUTS, SCORED
from services.protocol import Sampling, ScoredGroup
from services.streams import StreamClient, StreamSpec, connect, connect_sync, run_key

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)

VERIFY_TIMEOUT_S = 1.5
TOWER = "9^{9^{9^{9^{9}}}}"  # math-verify hands this to sympy, which tries to evaluate it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the default model's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def verifiers() -> Iterator[Verifiers]:
    """One reward replica's verifier pool: a single math worker, so the tests know which process holds an item."""
    pool = Verifiers(RewardConfig(verifier_workers=1, verify_timeout_s=VERIFY_TIMEOUT_S))
    assert pool.wait_ready(120), "the math worker did not warm up"
    yield pool
    pool.close()


async def wait_until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Poll ``check`` until it holds; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Redis unreachable


def math_items(count: int) -> list[DataItem]:
    """Math prompts for the feeder (a random model answers none of them: every group is dropped as no-signal)."""
    return [
        DataItem(f"q{i}", "math", [{"role": "user", "content": f"What is {i} + 1?"}], str(i + 1), [], "chain_sum")
        for i in range(count)
    ]


def pipeline_config(run: str, url: str, model: Path) -> RunConfig:
    """Small batches so the flow is steady; the ``redis`` retry settings stay at their defaults on purpose."""
    return RunConfig(
        name=run,
        redis={"url": url},
        streams={"visibility_timeout_s": 4.0, "block_ms": 200, "read_count": 8},
        model={"name_or_path": str(model)},
        sampling={"n": 2, "max_new_tokens": 8, "seed": 0},
        learner={"prompts_per_step": 2, "max_staleness": 1},
        rollout={"max_inflight_groups": 2},
        reward={"verifier_workers": 1, "verify_timeout_s": VERIFY_TIMEOUT_S},
    )


class LearnerSide:
    """What the learner does against Redis, without a model: feed prompts, assemble batches, ack them.

    Every group a tiny random model produces is wrong, so the assembler drops it as no-signal and hands its slot
    back to the feeder at once; the learner never gets a full batch, and the feeder keeps releasing. Every prompt
    the assembler settles (used or dropped) is recorded.
    """

    def __init__(self, cfg: RunConfig, redis: aioredis.Redis) -> None:
        self.feeder = PromptFeeder(cfg, redis, math_items(64))
        self.settled: set[str] = set()
        self.assembler = BatchAssembler(cfg, redis, "learner-0", on_settled=self._on_settled)
        self.version = 0

    def _on_settled(self, used: list[str], dropped: list[str]) -> None:
        self.settled.update(used, dropped)
        self.feeder.settle(used, dropped)

    async def consume(self, stop: asyncio.Event) -> None:
        """The learner loop's Redis side: next batch, ack it (the real loop acks after its checkpoint)."""
        while not stop.is_set():
            batch = await self.assembler.next_batch(self.version, stop)
            if batch is None:
                return
            await self.assembler.client.ack(batch.entry_ids)
            self.version += 1

    def released_ids(self) -> set[str]:
        """Prompt ids of every release so far."""
        return {self.feeder.prompt_id(k) for k in range(self.feeder.released)}


@pytest.mark.parametrize("outage_s", [5.0, pytest.param(30.0, marks=pytest.mark.slow)], ids=["5s", "30s"])
async def test_redis_outage_is_ridden_out_and_nothing_is_lost(
    outage_s: float, model_dir: Path, verifiers: Verifiers, tmp_path: Path
) -> None:
    server = LocalRedis(tmp_path / "redis", appendfsync="always").start()
    cfg = pipeline_config("outage", server.url, model_dir)
    aredis = connect(server.url, timeout_s=cfg.redis.socket_timeout_s)
    sredis = connect_sync(server.url, timeout_s=cfg.redis.socket_timeout_s)
    backend = HFBackend(model_dir, num_threads=1)
    weights = PolicyWeights(backend)
    sync = WeightSync(cfg, weights, sredis, "rollout-0", RolloutMetrics(), poll_s=0.2)
    rollout = RolloutWorker(cfg, backend, aredis, consumer="rollout-0", weights=weights)
    reward = RewardWorker(cfg, aredis, verifiers, consumer="reward-0")
    learner = LearnerSide(cfg, aredis)
    stop, feeder_stop = asyncio.Event(), asyncio.Event()
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        sync.initial_load()
        sync.start()
        tasks = {
            "feeder": asyncio.create_task(learner.feeder.run(lambda: learner.version, feeder_stop, 0.2)),
            "assembler": asyncio.create_task(learner.consume(stop)),
            "rollout worker": asyncio.create_task(rollout.run(stop)),
            "reward worker": asyncio.create_task(reward.run(stop)),
        }

        async def settled_at_least(count: int) -> bool:
            failed = {name: t.exception() for name, t in tasks.items() if t.done() and not t.cancelled()}
            assert not failed, f"components ended: {failed}"
            return len(learner.settled) >= count

        await wait_until("the pipeline to flow", lambda: settled_at_least(4), 120)
        server.kill()  # a crash (SIGKILL): every connection drops, and only what reached the AOF survives
        await asyncio.sleep(outage_s)
        server.start()  # same port and folder: the append-only file is replayed
        after_restart = len(learner.settled)
        alive = {name: not t.done() for name, t in tasks.items()} | {"weight sync": sync._thread.is_alive()}
        await wait_until("the flow to resume", lambda: settled_at_least(after_restart + 6), 180)

        feeder_stop.set()  # no new releases: now every released prompt must come through
        await tasks.pop("feeder")

        async def all_settled() -> bool:
            await learner.feeder.scan_dead_letters()
            return not learner.feeder.ledger()

        await wait_until("every released prompt to reach the learner", all_settled, 120)
    finally:
        stop.set()
        feeder_stop.set()
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        sync.stop()
        backend.close()
        await aredis.aclose()
        sredis.close()
        server.close()
    assert alive == dict.fromkeys(alive, True), "a component died during the outage"
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    released = learner.released_ids()
    assert learner.settled == released, sorted(released - learner.settled)  # each one reached the learner
    # the outage was felt: the consumers' calls failed and were retried
    assert reward.rollouts.stats.retries > 0 and rollout.prompts.stats.retries > 0


# ---------------------------------------------------------------------------------------------------------------------
# 2. A rollout server frozen inside a weight broadcast

SYNC_TIMEOUT_S = 5.0
PROBE = "Count: one, two,"


def policy_weights(model_dir: Path, version: int) -> dict[str, torch.Tensor]:
    """The learner's weights at ``version``: the tiny model shifted by version-seeded noise (as named_parameters)."""
    model = LlamaForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(version)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in model.named_parameters()}


def save_checkpoint(model_dir: Path, weights: dict[str, torch.Tensor], folder: Path) -> Path:
    """A Hugging Face folder holding ``weights``, as the learner's checkpoints are."""
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(folder)
    return folder


def start_rollout_server(tmp_path: Path, run: str, url: str, model: Path) -> subprocess.Popen[bytes]:
    """``python -m rollout_server`` on a free port (written to tmp_path/port), logging to tmp_path/server.log."""
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({
        "name": run, "redis": {"url": url}, "streams": {"block_ms": 200}, "model": {"name_or_path": str(model)},
        "rollout": {"torch_threads": 1, "weight_sync_timeout_s": SYNC_TIMEOUT_S},
    }))  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "server.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rollout_server", "--config", str(config), "--port-file", str(tmp_path / "port")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def greedy(backend: HFBackend) -> tuple[list[int], list[float]]:
    """Token ids and log-probs of the greedy continuation of PROBE."""
    [group] = backend.generate([PROBE], 1, Sampling(temperature=0.0, max_new_tokens=8))
    completion = group.completions[0]
    return [int(t) for t in completion.token_ids], [float(x) for x in completion.logprobs]


async def test_rollout_server_frozen_inside_a_broadcast_is_dropped_and_catches_up(
    model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    sync_redis = connect_sync(redis_url)
    policy_key, versions_key = run_key(run_name, POLICY), run_key(run_name, ROLLOUT_VERSIONS)
    sync_redis.hset(policy_key, mapping={"version": "0", "status": "running"})
    weights = {v: policy_weights(model_dir, v) for v in (1, 2, 3, 4)}
    state: dict[str, int] = {"version": 0, "frozen": 0}
    server: subprocess.Popen[bytes] | None = None

    def freeze_inside_round_2(bucket: int, data: torch.Tensor) -> None:
        # called by the broadcaster after the round's group formed, before bucket 0 is sent
        if state["version"] == 2 and bucket == 0 and server is not None:
            os.kill(server.pid, signal.SIGSTOP)
            state["frozen"] = server.pid

    learner = WeightBroadcaster(
        timeout_s=SYNC_TIMEOUT_S, publish=redis_hash_publisher(sync_redis, policy_key), tamper=freeze_inside_round_2
    )

    async def broadcast(version: int) -> BroadcastReport:
        state["version"] = version
        return await asyncio.to_thread(learner.broadcast, list(weights[version].items()), version)

    server = start_rollout_server(tmp_path, run_name, redis_url, model_dir)
    consumer = f"rollout-{os.uname().nodename}-{server.pid}"

    async def server_at(version: int) -> bool:
        assert server is not None and server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        return await redis_client.hget(versions_key, consumer) == str(version).encode()

    try:
        await wait_until("the server to start at v0", lambda: server_at(0), 120)
        assert await asyncio.to_thread(learner.wait_for_receivers, 1, 60) == 1
        report = await broadcast(1)
        [first_token] = report.receivers
        await wait_until("the server to apply v1", lambda: server_at(1), 30)

        report = await broadcast(2)  # the server freezes after the group formed: the collective times out
        assert state["frozen"] == server.pid
        assert report.receivers == ()
        assert list(report.dropped) == [first_token]
        assert report.dropped[first_token].startswith("collective failed")
        # meanwhile the learner checkpoints v2 and publishes it, as after any step with a checkpoint
        checkpoint = save_checkpoint(model_dir, weights[2], tmp_path / "step-000002")
        sync_redis.hset(policy_key, mapping={"version": "2", "checkpoint": str(checkpoint), "checkpoint_version": "2"})
        assert await server_at(1)  # still frozen on v1
        os.kill(server.pid, signal.SIGCONT)
        state["frozen"] = 0
        await wait_until("the server to catch up from the v2 checkpoint", lambda: server_at(2), 60)
        assert await asyncio.to_thread(learner.wait_for_receivers, 1, 60) == 1
        assert learner.members != [first_token]  # it joined again, as a new member
        for version in (3, 4):
            report = await broadcast(version)
            assert len(report.receivers) == 1 and not report.dropped, report
            await wait_until(f"the server to apply v{version}", functools.partial(server_at, version), 30)
        port = int((tmp_path / "port").read_text())
        body = {"prompt": PROBE, "n": 1, "sampling": {"temperature": 0.0, "max_new_tokens": 8}}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            resp = await http.post("/v1/generate", json=body)
        assert resp.status_code == 200, resp.text
        served = resp.json()
    finally:
        if state["frozen"]:
            os.kill(state["frozen"], signal.SIGCONT)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(40)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        learner.close()
        sync_redis.close()
    log = (tmp_path / "server.log").read_text()
    assert "loaded checkpoint" in log and "(v2," in log, log[-3000:]
    # its weights are the learner's v4, bit for bit as far as greedy decoding can tell, and not v3's
    local = HFBackend(model_dir, num_threads=1)
    try:
        local.swap(weights[4].items(), WeightsTag(4), [1, 2]).result(120)
        tokens, logprobs = greedy(local)
        local.swap(weights[3].items(), WeightsTag(3), [1, 2]).result(120)
        _, logprobs_v3 = greedy(local)
    finally:
        local.close()
    assert served["version"] == 4
    assert served["completions"][0]["token_ids"] == tokens
    assert served["completions"][0]["logprobs"] == pytest.approx(logprobs, abs=1e-5)
    assert served["completions"][0]["logprobs"] != pytest.approx(logprobs_v3, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# 3. A verification that hangs


async def test_stuck_verification_ends_as_timeout_and_the_stream_flows(
    verifiers: Verifiers, redis_client: aioredis.Redis, redis_url: str, run_name: str
) -> None:
    cfg = RunConfig(
        name=run_name,
        redis={"url": redis_url},
        streams={"block_ms": 100, "read_count": 4},
        reward={"verifier_workers": 1, "verify_timeout_s": VERIFY_TIMEOUT_S},
    )
    worker = RewardWorker(cfg, redis_client, verifiers, consumer="reward-stuck")
    rollouts = StreamClient(redis_client, StreamSpec(run_name, ROLLOUTS), "reward", "test")
    await rollouts.ensure_group()
    scored_key = str(StreamSpec(run_name, SCORED))
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))

    async def scored_count(count: int) -> bool:
        assert not running.done(), running
        return await redis_client.xlen(scored_key) >= count

    restarts = verifiers.get("math").worker_restarts
    frozen: list[int] = []
    try:
        # the power tower: sympy never finishes, the worker's own timer ends the item, the worker lives on
        groups = [math_group(f"a{i}", ["7", "3"]) for i in range(3)]
        groups.insert(1, math_group("tower", ["7", TOWER, "3"]))
        await rollouts.produce_many([g.to_bytes() for g in groups])
        await wait_until("the first groups to be scored", lambda: scored_count(len(groups)), 60)
        # a frozen worker: its timer cannot fire, so the parent's deadline kills it and starts a new one
        frozen = verifiers.get("math").worker_pids()
        assert len(frozen) == 1
        os.kill(frozen[0], signal.SIGSTOP)
        later = [math_group("frozen", ["7", "3"])] + [math_group(f"b{i}", ["7", "3"]) for i in range(3)]
        await rollouts.produce_many([g.to_bytes() for g in later])
        await wait_until("the later groups to be scored", lambda: scored_count(len(groups) + len(later)), 60)
    finally:
        stop.set()
        await running
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    scored = {
        g.rollout.task.prompt_id: g
        for g in (ScoredGroup.from_bytes(f[b"d"]) for _, f in await redis_client.xrange(scored_key))
    }
    assert sorted(scored) == sorted(g.task.prompt_id for g in groups + later)  # every group, each once
    assert scored["tower"].status == ["correct", "timeout", "wrong"]
    assert scored["frozen"].status == ["timeout", "wrong"]  # the killed worker's item; the next one ran on its heir
    for prompt_id in ("a0", "a1", "a2", "b0", "b1", "b2"):
        assert scored[prompt_id].status == ["correct", "wrong"]
    math = verifiers.get("math")
    assert math.worker_restarts == restarts + 1 and frozen[0] not in math.worker_pids()
    assert (await rollouts.info()).pending == 0
    assert await redis_client.xlen(str(StreamSpec(run_name, DEADLETTER))) == 0
