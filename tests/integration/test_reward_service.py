"""The reward service against a real Redis: shared window, two replicas as processes, SIGKILL, the HTTP app."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
import yaml
from factories import math_group

from reward_service.app import create_app
from reward_service.window import PplWindow
from services.config import load_config
from services.contracts import DEADLETTER, ROLLOUTS, SCORED
from services.protocol import DeadLetter, ScoredGroup
from services.streams import StreamClient, StreamSpec

REPO = Path(__file__).resolve().parents[2]


def window(redis: aioredis.Redis, run: str, **kw: object) -> PplWindow:
    args: dict = {"capacity": 64, "min_window": 8, "refit_every_items": 16, "refit_every_s": 3600.0}
    args.update(kw)
    return PplWindow(redis, run, "math", **args)


async def test_window_is_capped_shared_and_refit_on_schedule(redis_client: aioredis.Redis, run_name: str) -> None:
    a, b = window(redis_client, run_name), window(redis_client, run_name)
    first = await a.current()
    assert not first.fit.gate_open and first.fit.window_size == 0  # empty window: gate closed
    rng = np.random.default_rng(0)
    for _ in range(10):  # 80 items, low perplexity correct, high perplexity wrong
        correct = rng.random(8) < 0.5
        ppl = np.where(correct, rng.uniform(1.0, 1.5, 8), rng.uniform(2.0, 3.0, 8))
        await a.append(ppl, correct)
    ppl, correct, count = await b.read()
    assert len(ppl) == 64 and count == 80  # capped at K, oldest dropped
    fit_b = await b.current()  # 80 new items since the last fit: b refits
    fit_a = await a.current()  # not due again: a uses b's fit
    assert fit_b == fit_a
    assert fit_a.fit.gate_open and 1.5 <= fit_a.fit.tau <= 2.0
    assert fit_a.fit.window_size == 64
    await a.append(np.array([1.2]), np.array([True]))
    assert await a.current() == fit_a  # one new item is below refit_every_items
    assert a.refits + b.refits == 2


async def test_nonfinite_items_stay_out_of_the_window(redis_client: aioredis.Redis, run_name: str) -> None:
    w = window(redis_client, run_name)
    added = await w.append(np.array([1.1, np.nan, np.inf]), np.array([True, False, True]))
    assert added == 1


def _write_config(tmp_path: Path, run: str, url: str, **reward: object) -> Path:
    cfg = {
        "name": run,
        "redis": {"url": url},
        "streams": {"visibility_timeout_s": 3.0, "block_ms": 200, "read_count": 8},
        "sampling": {"n": 4},
        "learner": {"prompts_per_step": 8},
        "reward": {"verifier_workers": 1, "dipo": {"refit_every_items": 16, "min_window": 8}, **reward},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_replica(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "reward_service", "--config", str(config)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _groups(count: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(count):
        answers = [str(rng.choice(["7", "3"], p=[0.5, 0.5])) for _ in range(4)]
        nlls = [0.2 if a == "7" else 1.0 for a in answers]
        out.append(math_group(f"g{i}", answers, nlls=[x + 0.01 * j for j, x in enumerate(nlls)]).to_bytes())
    return out


async def _scored_by(redis: aioredis.Redis, key: str, consumer: str) -> bool:
    return any(ScoredGroup.from_bytes(f[b"d"]).scorer_id == consumer for _, f in await redis.xrange(key))


async def _pending_of(redis: aioredis.Redis, key: str, consumer: str) -> int:
    rows = await redis.xpending_range(key, "reward", min="-", max="+", count=1000, consumername=consumer)
    return len(rows)


async def test_two_replicas_one_killed_score_every_group_exactly_once(
    redis_client: aioredis.Redis, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    config = _write_config(tmp_path, run_name, redis_url)
    rollouts = StreamClient(redis_client, StreamSpec(run_name, ROLLOUTS), "reward", "test")
    await rollouts.ensure_group()
    payloads = _groups(240)
    a = _start_replica(config, tmp_path / "a.log")
    b = _start_replica(config, tmp_path / "b.log")
    scored_key = str(StreamSpec(run_name, SCORED))
    try:
        # both replicas must be reading before work arrives, or the first one up scores everything
        deadline = time.monotonic() + 120
        while not all("consuming" in (tmp_path / f"{n}.log").read_text() for n in ("a", "b")):
            assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-2000:]
            await asyncio.sleep(0.1)
        await rollouts.produce_many(payloads[:200])
        await rollouts.produce(b"\x93not a rollout")  # poison: must end in the dead-letter stream
        # wait until replica a has scored something, then kill it while it holds work (mid-batch)
        consumer_a = f"reward-{os.uname().nodename}-{a.pid}"
        deadline = time.monotonic() + 120
        while not await _scored_by(redis_client, scored_key, consumer_a):
            if time.monotonic() > deadline:
                pytest.fail(f"replica a never scored:\n{(tmp_path / 'a.log').read_text()[-3000:]}")
            await asyncio.sleep(0.01)
        while await _pending_of(redis_client, str(rollouts.spec), consumer_a) == 0:
            if time.monotonic() > deadline:
                pytest.fail("replica a never held work in flight")
            if await redis_client.xlen(scored_key) > len(payloads) - 40:
                pytest.fail("the replicas finished before a could be caught mid-batch")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        orphaned = await rollouts.pending_ids(consumer_a)
        await asyncio.sleep(2.5)  # past the refit lock's TTL, in case the killed replica held it
        await rollouts.produce_many(payloads[200:])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and await redis_client.xlen(scored_key) < len(payloads):
            await asyncio.sleep(0.2)
        entries = await redis_client.xrange(scored_key)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    scored = [ScoredGroup.from_bytes(fields[b"d"]) for _, fields in entries]
    ids = Counter(s.rollout.task.prompt_id for s in scored)
    assert len(ids) == len(payloads), (tmp_path / "b.log").read_text()[-3000:]
    assert max(ids.values()) == 1  # exactly once
    info = await rollouts.info()
    assert info.pending == 0
    dead = [DeadLetter.from_bytes(f[b"d"]) for _, f in await redis_client.xrange(str(StreamSpec(run_name, DEADLETTER)))]
    assert len(dead) == 1 and dead[0].source_stream == str(rollouts.spec)
    # both replicas scored, and wherever they scored under the same fit they used the same tau*
    by_fit: dict[float, set[float]] = {}
    for s in scored:
        by_fit.setdefault(s.fit_at, set()).add(s.tau)
    assert all(len(taus) == 1 for taus in by_fit.values())
    assert {s.scorer_id.rsplit("-", 1)[1] for s in scored} == {str(a.pid), str(b.pid)}
    # what the killed replica held was claimed and scored by the survivor
    ids_by_entry = {
        entry_id.decode(): i for i, (entry_id, _) in enumerate(await redis_client.xrange(str(rollouts.spec)))
    }
    assert orphaned and all(entry_id in ids_by_entry for entry_id in orphaned)
    late = {f"g{i}" for i in range(200, len(payloads))}
    assert any(s.gate_open for s in scored if s.rollout.task.prompt_id in late)  # the window filled, the gate opened


@pytest.fixture
async def reward_app(redis_url: str, run_name: str):  # noqa: ANN201
    cfg = load_config(
        None, [f"name={run_name}", f"redis.url={redis_url}", "reward.verifier_workers=1",
               "reward.server.api_token=sekrit", "reward.server.max_body_bytes=65536"], environ={},
    )  # fmt: skip
    app = create_app(cfg, run_worker=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://reward") as client:
            yield client


SCORE_BODY = {
    "task": {"task_kind": "math", "messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2"},
    "responses": [
        {"text": "\\boxed{2}", "token_ids": [1, 2, 3], "logprobs": [-0.1, -0.2, -0.3]},
        {"text": "\\boxed{3}", "token_ids": [1, 2], "logprobs": [-1.0, -2.0]},
    ],
}
AUTH = {"Authorization": "Bearer sekrit"}


async def test_health_scores_a_known_item(reward_app: httpx.AsyncClient) -> None:
    resp = await reward_app.get("/health")
    assert resp.status_code == 200, resp.text
    assert resp.json()["ok"] is True


async def test_score_endpoint_uses_the_worker_path(reward_app: httpx.AsyncClient) -> None:
    resp = await reward_app.post("/v1/score", json=SCORE_BODY, headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == ["correct", "wrong"]
    assert body["reward"] == [1.0, 0.0]
    assert body["perplexity"][0] == pytest.approx(float(np.exp(0.2)), rel=1e-5)
    assert body["group_kind"] == "normal" and body["signal"] is True
    packed = math_group("p", ["7", "7"]).to_bytes()
    resp = await reward_app.post("/v1/score", content=packed, headers={**AUTH, "content-type": "application/msgpack"})
    assert resp.status_code == 200 and resp.json()["group_kind"] == "easy"


@pytest.mark.parametrize(
    ("headers", "expected"), [({}, 401), ({"Authorization": "Bearer nope"}, 403), ({"Authorization": "Basic x"}, 401)]
)
async def test_score_requires_the_token(reward_app: httpx.AsyncClient, headers: dict, expected: int) -> None:
    resp = await reward_app.post("/v1/score", json=SCORE_BODY, headers=headers)
    assert resp.status_code == expected


async def test_bad_bodies_are_4xx(reward_app: httpx.AsyncClient) -> None:
    big = {**SCORE_BODY, "task": {**SCORE_BODY["task"], "ground_truth": "9" * 100_000}}
    assert (await reward_app.post("/v1/score", json=big, headers=AUTH)).status_code == 413
    mismatch = {**SCORE_BODY, "responses": [{"text": "x", "token_ids": [1, 2], "logprobs": [-1.0]}]}
    assert (await reward_app.post("/v1/score", json=mismatch, headers=AUTH)).status_code == 422
    extra = {**SCORE_BODY, "surprise": 1}
    assert (await reward_app.post("/v1/score", json=extra, headers=AUTH)).status_code == 422
    garbage = await reward_app.post(
        "/v1/score", content=b"\xc1\xc1", headers={**AUTH, "content-type": "application/msgpack"}
    )
    assert garbage.status_code == 422
    assert (
        await reward_app.post("/v1/score", content=b"x", headers={**AUTH, "content-type": "text/plain"})
    ).status_code == 415


async def test_metrics_are_exported(reward_app: httpx.AsyncClient) -> None:
    await reward_app.post("/v1/score", json=SCORE_BODY, headers=AUTH)
    text = (await reward_app.get("/metrics/")).text
    assert 'dipo_reward_responses_total{status="correct",task_kind="math"}' in text
