"""Redis error replies other than a lost connection (issue 16.9), against a real redis-server.

- "Not now" replies (OOM at ``maxmemory``, READONLY on a replica) are ridden out like an outage: retried with
  backoff, and once the retries are spent raised as ``RedisUnavailable``, which every long-lived loop already
  treats as an outage (it is one of ``TRANSIENT_ERRORS``).
- ``UNBLOCKED`` (the stream key was deleted while a read blocked on it) is a vanished group: recreated, reading
  goes on.
- Any other error ends the process: a reward service whose input stream key holds a string (WRONGTYPE) exits 1
  with the error in its log, instead of staying up with a dead worker and a 503 ``/health`` for ever.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from runner.redis_server import LocalRedis, free_port
from services.contracts import ROLLOUTS
from services.streams import TRANSIENT_ERRORS, RedisUnavailable, StreamClient, StreamSpec, connect, run_key

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A Redis of this module's own: the tests below turn it into a full or read-only server."""
    server = LocalRedis(tmp_path_factory.mktemp("redis-errors")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(private_redis: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    redis = connect(private_redis.url, timeout_s=5.0)
    try:
        yield redis
    finally:
        await redis.execute_command("CONFIG", "SET", "maxmemory", "0")
        await redis.execute_command("REPLICAOF", "NO", "ONE")
        await redis.aclose()


def stream(redis: aioredis.Redis, run: str, retries: int = 8) -> StreamClient:
    return StreamClient(redis, StreamSpec(run, "things"), "g", "c", retries=retries, backoff_base_s=0.05,
                        backoff_cap_s=0.2)  # fmt: skip


async def _used_memory(redis: aioredis.Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def test_a_full_redis_is_waited_out_and_the_write_lands(client: aioredis.Redis, run_name: str) -> None:
    things = stream(client, run_name)
    await client.execute_command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    await client.execute_command("CONFIG", "SET", "maxmemory", str(await _used_memory(client) // 2))
    write = asyncio.create_task(things.produce(b"x" * 1000))
    await asyncio.sleep(0.5)
    assert not write.done()  # refused with OOM and being retried, not failed
    await client.execute_command("CONFIG", "SET", "maxmemory", "0")
    entry_id = await asyncio.wait_for(write, 10)
    assert (await client.xrange(str(things.spec)))[0][0].decode() == entry_id
    assert things.stats.retries >= 1


async def test_a_read_only_redis_outlasting_the_retries_is_an_outage(client: aioredis.Redis, run_name: str) -> None:
    things = stream(client, run_name, retries=2)
    await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master that is not there
    with pytest.raises(RedisUnavailable, match="ReadOnly") as caught:
        await things.produce(b"x")
    assert isinstance(caught.value, TRANSIENT_ERRORS)  # what the workers' loops catch and wait on
    assert things.stats.retries == 2
    await client.execute_command("REPLICAOF", "NO", "ONE")
    assert await things.produce(b"x")


async def test_other_error_replies_are_not_retried(client: aioredis.Redis, run_name: str) -> None:
    things = stream(client, run_name)
    await client.set(str(things.spec), "a string, not a stream")
    with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
        await things.produce(b"x")
    assert things.stats.retries == 0


async def test_a_stream_deleted_under_a_blocked_read_is_recreated(client: aioredis.Redis, run_name: str) -> None:
    things = stream(client, run_name)
    await things.ensure_group()
    read = asyncio.create_task(things.read(count=1, block_ms=5000))
    await asyncio.sleep(0.3)  # blocked in XREADGROUP
    await client.delete(str(things.spec))  # Redis 7 answers the blocked read with UNBLOCKED
    assert await asyncio.wait_for(read, 10) == []
    assert things.stats.group_recreated == 1
    await things.produce(b"after")
    assert [e.fields["d"] for e in await things.read(count=1, block_ms=100)] == [b"after"]


def test_the_reward_service_exits_when_its_stream_worker_dies(private_redis: LocalRedis, tmp_path: Path) -> None:
    run = "wrongtype"
    cfg = {"name": run, "redis": {"url": private_redis.url}, "reward": {"verifier_workers": 1},
           "streams": {"block_ms": 200}}  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))

    async def poison() -> None:
        redis = connect(private_redis.url, timeout_s=5.0)
        await redis.set(run_key(run, ROLLOUTS), "a string where the rollouts stream should be")
        await redis.aclose()

    asyncio.run(poison())
    log = tmp_path / "reward.log"
    with log.open("wb") as out:
        command = [sys.executable, "-m", "reward_service", "--config", str(config)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "the reward stream worker stopped" in text and "WRONGTYPE" in text, text[-3000:]
