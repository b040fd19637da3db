"""Weight provenance and sync faults against real rollout-server processes, a real Redis and real broadcasts.

- a server whose swap applies other bytes than it received is caught by its canary: its groups are rejected, it is
  quarantined, reloads the newest checkpoint and its later groups check out;
- a learner killed in the middle of a broadcast (a truncated round) leaves every server on its old weights, and the
  next learner's broadcast reaches them;
- a server killed right after receiving an update restarts from the published checkpoint and rejoins the rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import torch
from test_rollout_server import (
    REPO,
    consumer_of,
    rollouts_of,
    save_rollout_llama,
    shifted_weights,
    stop_all,
    task,
    wait_for,
    write_config,
)
from transformers import LlamaForCausalLM

from learner.provenance import Provenance, canary_reference
from learner.weight_sync import WeightBroadcaster, redis_hash_publisher
from rollout_server.policy_weights import CORRUPT_SWAPS_ENV
from services.config import load_config
from services.contracts import FINGERPRINT_FILE, POLICY, PROMPTS, QUARANTINE, ROLLOUT_GROUP, ROLLOUT_VERSIONS
from services.modeling.canary import canary_token_ids
from services.modeling.loading import load_tokenizer
from services.streams import StreamClient, StreamSpec, connect_sync, run_key

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_rollout_server's small random Llama."""
    return save_rollout_llama(tmp_path_factory.mktemp("rollout-llama"))


@dataclass
class Harness:
    """An in-test learner for one run: the policy hash (status running at v0), a weight broadcaster, the provenance
    judge, the prompts stream, and a rollout-server config."""

    sync_redis: redis.Redis
    policy_key: str
    learner: WeightBroadcaster
    provenance: Provenance
    prompts: StreamClient
    config: Path

    def set_policy(self, **fields: str) -> None:
        self.sync_redis.hset(self.policy_key, mapping=fields)

    def broadcaster(self) -> WeightBroadcaster:
        """Another learner's broadcaster (a new store and endpoint, as after a learner restart)."""
        return WeightBroadcaster(timeout_s=20.0, publish=redis_hash_publisher(self.sync_redis, self.policy_key))


@pytest.fixture
async def harness(
    model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    sync_redis = connect_sync(redis_url)
    policy_key = run_key(run_name, POLICY)
    sync_redis.hset(policy_key, mapping={"version": "0", "status": "running"})
    learner = WeightBroadcaster(timeout_s=20.0, publish=redis_hash_publisher(sync_redis, policy_key))
    prompts = StreamClient(redis_client, StreamSpec(run_name, PROMPTS), ROLLOUT_GROUP, "test")
    await prompts.ensure_group()
    config = write_config(tmp_path, run_name, redis_url, model_dir, "server")
    provenance = Provenance(load_config(None, [f"name={run_name}", f"redis.url={redis_url}"], environ={}), redis_client)
    try:
        yield Harness(sync_redis, policy_key, learner, provenance, prompts, config)
    finally:
        learner.close()
        sync_redis.close()


def start_server(config: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A rollout server that writes its HTTP port to ``<log>.port``."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rollout_server", "--config", str(config), "--port-file", f"{log}.port"],
            cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def health(log: Path) -> dict:
    port = Path(f"{log}.port").read_text().strip()
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/health", timeout=30)).json()


def reference_canary(base: Path, weights: dict[str, torch.Tensor]) -> np.ndarray:
    """The learner's canary scoring of ``weights``: teacher-forced log-probs of the canary at T = 1."""
    ids = torch.tensor([canary_token_ids(load_tokenizer(base))])
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()


def save_checkpoint(base: Path, weights: dict[str, torch.Tensor], folder: Path, fingerprint: str) -> Path:
    """A Hugging Face folder of ``weights`` with the fingerprint file the learner writes next to them."""
    model = LlamaForCausalLM.from_pretrained(base)
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(folder)
    (folder / FINGERPRINT_FILE).write_text(fingerprint)
    return folder


async def published(redis: aioredis.Redis, run: str, procs: list[subprocess.Popen[bytes]], version: int) -> bool:
    got = await redis.hgetall(run_key(run, ROLLOUT_VERSIONS))
    return all(got.get(consumer_of(p).encode()) == str(version).encode() for p in procs)


async def test_a_corrupted_swap_is_caught_by_its_canary_and_the_server_recovers(
    harness: Harness, model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    learner, provenance, prompts, config = harness.learner, harness.provenance, harness.prompts, harness.config
    logs = [tmp_path / "bad.log", tmp_path / "good.log"]
    bad = start_server(config, logs[0], **{CORRUPT_SWAPS_ENV: "1"})  # its first swap applies scaled weights
    good = start_server(config, logs[1])
    try:
        await wait_for("both servers to publish v0", lambda: published(redis_client, run_name, [bad, good], 0), 120,
                       logs)  # fmt: skip
        assert await asyncio.to_thread(learner.wait_for_receivers, 2, 60) == 2
        v1 = shifted_weights(model_dir, 1)
        report = await asyncio.to_thread(learner.broadcast, list(v1.items()), 1)
        assert len(report.receivers) == 2 and not report.dropped, report  # both received the right bytes
        await provenance.record(canary_reference(1, report.fingerprint, reference_canary(model_dir, v1)))
        checkpoint = save_checkpoint(model_dir, v1, tmp_path / "step-000001", report.fingerprint)
        harness.set_policy(version="1", checkpoint=str(checkpoint), checkpoint_version="1")
        await wait_for("both servers to swap in v1", lambda: published(redis_client, run_name, [bad, good], 1), 30,
                       logs)  # fmt: skip
        await prompts.produce_many([task(i, max_new_tokens=6).to_bytes() for i in range(12)])

        async def both_answered() -> bool:
            workers = {g.worker_id for g in await rollouts_of(redis_client, run_name)}
            return workers == {consumer_of(bad), consumer_of(good)}

        await wait_for("groups from both servers", both_answered, 60, logs)
        before = await rollouts_of(redis_client, run_name)
        verdicts = {g.task.prompt_id: (g.worker_id, await provenance.check(g)) for g in before}
        quarantined = await redis_client.hget(run_key(run_name, QUARANTINE), consumer_of(bad))

        async def recovered() -> bool:  # the server reloaded the checkpoint and cleared its flag
            return await redis_client.hget(run_key(run_name, QUARANTINE), consumer_of(bad)) is None

        await wait_for("the quarantined server to reload the checkpoint", recovered, 60, logs)
        seen = {g.task.prompt_id for g in before}
        await prompts.produce_many([task(i, max_new_tokens=6).to_bytes() for i in range(12, 40)])

        async def bad_answered_again() -> bool:
            return any(g.worker_id == consumer_of(bad) and g.task.prompt_id not in seen
                       for g in await rollouts_of(redis_client, run_name))  # fmt: skip

        await wait_for("the recovered server to answer new prompts", bad_answered_again, 60, logs)
        # (groups of the first 12 prompts still in flight at the reload span both scorings and are left out)
        after = [g for g in await rollouts_of(redis_client, run_name) if int(g.task.prompt_id[1:]) >= 12]
        state = await health(logs[0])
    finally:
        stop_all(bad, good)
    for worker, problem in verdicts.values():
        if worker == consumer_of(good):
            assert problem is None
        else:
            assert problem is not None and "canary mismatch" in problem, problem
    assert quarantined == b"1" and provenance.quarantined == 1
    bad_after = [g for g in after if g.worker_id == consumer_of(bad)]
    assert [await provenance.check(g) for g in bad_after] == [None] * len(bad_after)  # its reloaded weights are v1
    # groups made before the reload stay rejected: they are judged by the scoring in force while they were made
    old = next(g for g in before if g.worker_id == consumer_of(bad))
    assert "canary mismatch" in (await provenance.check(old) or "")
    assert state["ok"] and state["version"] == 1 and state["weights"] == report.fingerprint
    assert "quarantined this server" in logs[0].read_text()


async def test_a_learner_killed_mid_broadcast_leaves_the_server_on_its_old_weights(
    harness: Harness, model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    first = harness.learner
    log = tmp_path / "server.log"
    server = start_server(harness.config, log)
    dying_log = tmp_path / "dying.log"
    try:
        await wait_for("the server to publish v0", lambda: published(redis_client, run_name, [server], 0), 120, [log])
        assert await asyncio.to_thread(first.wait_for_receivers, 1, 60) == 1
        v1 = shifted_weights(model_dir, 1)
        report = await asyncio.to_thread(first.broadcast, list(v1.items()), 1)
        assert report.receivers, report
        await wait_for("the server to swap in v1", lambda: published(redis_client, run_name, [server], 1), 30, [log])
        # A second learner takes over (it publishes a new endpoint) and dies after sending part of v2.
        resyncs = log.read_text().count("needs a resync")
        argv = [sys.executable, str(REPO / "tests/integration/_dying_learner.py"), "--redis", redis_url,
                "--run", run_name, "--model", str(model_dir), "--version", "2", "--seed", "2",
                "--die-at", "3"]  # fmt: skip
        with dying_log.open("wb") as out:
            dying = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=240, check=False)
        assert dying.returncode == -9, dying_log.read_text()
        assert "dying before bucket 3" in dying_log.read_text()

        async def resynced() -> bool:
            return log.read_text().count("needs a resync") > resyncs

        await wait_for("the server to notice the truncated round", resynced, 60, [log])
        state = await health(log)
        # A third learner: the server joins it and takes the next version in full.
        third = harness.broadcaster()
        try:
            assert await asyncio.to_thread(third.wait_for_receivers, 1, 60) == 1
            v3 = shifted_weights(model_dir, 3)
            final = await asyncio.to_thread(third.broadcast, list(v3.items()), 3)
            await wait_for("the server to swap in v3", lambda: published(redis_client, run_name, [server], 3), 30,
                           [log])  # fmt: skip
            later = await health(log)
        finally:
            third.close()
    finally:
        stop_all(server)
    # after the truncated round: still v1, whole (not half-updated), and the engine still answers
    assert state["ok"] and state["version"] == 1 and state["weights"] == report.fingerprint, state
    assert final.receivers and later["ok"] and later["version"] == 3 and later["weights"] == final.fingerprint


async def test_a_server_killed_after_receiving_restarts_from_the_checkpoint_and_rejoins(
    harness: Harness, model_dir: Path, redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    learner, provenance, prompts, config = harness.learner, harness.provenance, harness.prompts, harness.config
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = start_server(config, logs[0])
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for("the server to publish v0", lambda: published(redis_client, run_name, [first], 0), 120, logs)
        assert await asyncio.to_thread(learner.wait_for_receivers, 1, 60) == 1
        v1 = shifted_weights(model_dir, 1)
        checkpoint = save_checkpoint(model_dir, v1, tmp_path / "step-000001", learner.fingerprint(list(v1.items()), 1))
        harness.set_policy(checkpoint=str(checkpoint), checkpoint_version="1")
        v2 = shifted_weights(model_dir, 2)
        report = await asyncio.to_thread(learner.broadcast, list(v2.items()), 2)
        assert report.receivers, report
        first.kill()  # the ack is on receipt: the swap is under way or about to be
        first.wait(10)
        await provenance.record(canary_reference(2, report.fingerprint, reference_canary(model_dir, v2)))
        await provenance.record(canary_reference(1, checkpoint.joinpath(FINGERPRINT_FILE).read_text(),
                                                 reference_canary(model_dir, v1)))  # fmt: skip
        second = start_server(config, logs[1])
        await wait_for("the restarted server to load the checkpoint",
                       lambda: published(redis_client, run_name, [second], 1), 120, logs)  # fmt: skip
        await prompts.produce_many([task(i, max_new_tokens=6).to_bytes() for i in range(3)])

        async def answered() -> bool:
            return len(await rollouts_of(redis_client, run_name)) >= 3

        await wait_for("the restarted server's groups", answered, 60, logs)
        groups = await rollouts_of(redis_client, run_name)
        # it joined the rounds again (the killed server never left: the next round drops it after a timeout)
        assert await asyncio.to_thread(learner.wait_for_receivers, 2, 60) == 2
        again = await asyncio.to_thread(learner.broadcast, list(v2.items()), 2)
        await wait_for("the restarted server to swap in v2", lambda: published(redis_client, run_name, [second], 2),
                       30, logs)  # fmt: skip
        state = await health(logs[1])
    finally:
        stop_all(*[p for p in (first, second) if p is not None])
    assert {g.worker_id for g in groups} == {consumer_of(second)}
    assert all(g.oldest_version == 1 for g in groups)
    assert [await provenance.check(g) for g in groups] == [None] * len(groups)  # the checkpoint's weights are v1's
    assert again.fingerprint == report.fingerprint
    assert [m.split("#")[0] for m in again.receivers] == [consumer_of(second)]
    assert [m.split("#")[0] for m in again.dropped] == [consumer_of(first)]
    assert state["ok"] and state["version"] == 2 and state["weights"] == report.fingerprint
