"""Stream client semantics against a real redis-server: groups, acks, claims, dead letters, crashes and restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from runner.redis_server import LocalRedis
from services.contracts import DEADLETTER, PROMPTS
from services.protocol import DeadLetter, PromptTask, Sampling
from services.streams import RecentIds, StreamClient, StreamSpec, connect, run_key

WORKER = Path(__file__).with_name("_stream_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def task(prompt_id: str) -> PromptTask:
    return PromptTask(prompt_id, "math", [{"role": "user", "content": "1+1?"}], "2", 2, Sampling())


# ------------------------------------------------------------------------------------------------ keys and helpers


def test_spec_str_is_the_key_and_names_are_checked() -> None:
    spec = StreamSpec("run-1", PROMPTS)
    assert str(spec) == "dipo:run-1:prompts"
    assert str(spec.sibling(DEADLETTER)) == "dipo:run-1:deadletter" == run_key("run-1", "deadletter")
    for bad in ("", "a:b", "a b", "-x"):
        with pytest.raises(ValueError):
            StreamSpec(bad, PROMPTS)


def test_recent_ids_drops_duplicates_within_capacity() -> None:
    seen = RecentIds(capacity=2)
    assert seen.add("a") and seen.add("b") and not seen.add("a")
    assert seen.add("c")  # evicts the least recently seen, "b"
    assert "b" not in seen and "a" in seen and len(seen) == 2


def test_connect_checks_url_and_tls_options() -> None:
    with pytest.raises(ValueError):
        connect("http://localhost:1")
    with pytest.raises(ValueError, match="rediss"):
        connect("redis://localhost:1", ssl_ca_certs="/ca.pem")
    client = connect("rediss://localhost:1", ssl_ca_certs="/ca.pem", ssl_cert_reqs="none")
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"


async def test_password_url_connects() -> None:
    with LocalRedis(password="s3cret:/@") as server:
        client = connect(server.url)
        assert await client.ping()
        await client.aclose()
        anonymous = connect(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(redis.AuthenticationError):
            await anonymous.ping()
        await anonymous.aclose()


# ------------------------------------------------------------------------------------------------ single process


@pytest.fixture
def clients(redis_client: aioredis.Redis, run_name: str) -> Callable[..., StreamClient]:
    def make(consumer: str = "c0", **kwargs: Any) -> StreamClient:
        return StreamClient(redis_client, StreamSpec(run_name, PROMPTS), "g", consumer, timeout_s=5.0, **kwargs)

    return make


async def test_produce_read_ack_and_info(clients: Callable[..., StreamClient]) -> None:
    c = clients()
    await c.ensure_group()
    await c.ensure_group()  # BUSYGROUP is not an error
    ids = await c.produce_many([task(f"p{i}").to_bytes() for i in range(5)])
    assert len(set(ids)) == 5 and await c.produce_many([]) == []
    entries = await c.read(count=3, block_ms=0)
    assert [e.id for e in entries] == ids[:3] and all(e.deliveries == 1 for e in entries)
    info = await c.info()
    assert (info.length, info.pending, info.lag, info.consumers) == (5, 3, 2, 1)
    assert await c.ack([e.id for e in entries]) == 3
    assert await c.ack([entries[0].id]) == 0  # already acknowledged
    assert (await c.info()).pending == 0


async def test_read_blocks_then_returns_empty(clients: Callable[..., StreamClient]) -> None:
    c = clients()
    await c.ensure_group()
    started = time.monotonic()
    assert await c.read(block_ms=150) == []
    assert time.monotonic() - started >= 0.1


async def test_decode_failures_go_to_deadletter(clients: Callable[..., StreamClient], redis_client: Any) -> None:
    c = clients()
    await c.ensure_group()
    good = await c.produce(task("ok").to_bytes())
    bad = await c.produce(b"\x93garbage")
    no_data = await redis_client.xadd(c.key, {"other": b"x"})
    got = await c.read_decoded(PromptTask.from_bytes, count=10, block_ms=0)
    assert [(i, t.prompt_id) for i, t in got] == [(good, "ok")]
    assert (await c.info()).pending == 1  # only the good one waits for its ack
    letters = [DeadLetter.from_bytes(f[b"d"]) for _, f in await redis_client.xrange(str(c.deadletter))]
    assert [(d.entry_id, d.fields) for d in letters] == [
        (bad, {"d": b"\x93garbage"}),
        (no_data.decode(), {"other": b"x"}),
    ]
    assert all(d.source_stream == c.key and d.group == "g" and d.consumer == "c0" and d.error for d in letters)
    assert c.stats.dead_lettered == 2


async def test_claim_counts_deliveries_and_deadletters_past_the_limit(
    clients: Callable[..., StreamClient], redis_client: Any
) -> None:
    first, second = clients("c1", max_deliveries=2), clients("c2", max_deliveries=2)
    await first.ensure_group()
    entry_id = await first.produce(task("crashy").to_bytes())
    assert len(await first.read(block_ms=0)) == 1  # delivery 1; c1 "dies"
    claimed = await second.claim_decoded(PromptTask.from_bytes, min_idle_ms=0)
    assert [(i, t.prompt_id) for i, t in claimed] == [(entry_id, "crashy")]  # delivery 2
    assert await second.claim_idle(min_idle_ms=60_000) == []  # not idle long enough
    assert await first.claim_idle(min_idle_ms=0) == []  # delivery 3 > limit: dead-lettered
    letters = [DeadLetter.from_bytes(f[b"d"]) for _, f in await redis_client.xrange(str(first.deadletter))]
    assert [(d.entry_id, d.deliveries) for d in letters] == [(entry_id, 3)]
    assert PromptTask.from_bytes(letters[0].fields["d"]).prompt_id == "crashy"
    assert (await first.info()).pending == 0


async def test_claim_skips_entries_deleted_while_pending(
    clients: Callable[..., StreamClient], redis_client: Any
) -> None:
    first, second = clients("c1"), clients("c2")
    await first.ensure_group()
    kept, gone = await first.produce_many([task("kept").to_bytes(), task("gone").to_bytes()])
    await first.read(block_ms=0)
    await redis_client.xdel(first.key, gone)
    assert [e.id for e in await second.claim_idle(min_idle_ms=0, count=10)] == [kept]
    assert second.stats.deleted_while_pending == 1
    assert await second.pending_ids() == [kept]


async def test_ack_with_outputs_is_one_transaction(clients: Callable[..., StreamClient], redis_client: Any) -> None:
    c = clients()
    await c.ensure_group()
    await c.produce(b"x")
    [entry] = await c.read(block_ms=0)
    out = c.spec.sibling("rollouts")
    assert await c.ack([entry.id], produce=[(out, b"r1"), (out, b"r2")]) == 1
    assert [f[b"d"] for _, f in await redis_client.xrange(str(out))] == [b"r1", b"r2"]
    assert (await c.info()).pending == 0


async def test_maxlen_trims_approximately_only_when_asked(clients: Callable[..., StreamClient]) -> None:
    capped, uncapped = clients(), StreamClient(clients().redis, clients().spec.sibling("other"))
    for _ in range(300):
        await capped.produce(b"x", maxlen=10)
        await uncapped.produce(b"x")
    assert await capped.redis.xlen(capped.key) < 300
    assert await uncapped.redis.xlen(uncapped.key) == 300


async def test_group_is_recreated_if_the_stream_vanishes(
    clients: Callable[..., StreamClient], redis_client: Any
) -> None:
    c = clients()
    await c.ensure_group()
    await redis_client.delete(c.key)
    assert await c.read(block_ms=0) == []
    assert c.stats.group_recreated == 1
    await c.produce(b"after")
    assert [e.data for e in await c.read(block_ms=0)] == [b"after"]


async def test_retries_are_bounded_when_redis_is_gone() -> None:
    dead = connect(f"redis://127.0.0.1:{_unused_port()}/0", timeout_s=0.5)
    client = StreamClient(dead, StreamSpec("r", PROMPTS), timeout_s=0.5, retries=2, backoff_base_s=0.01)
    with pytest.raises(redis.ConnectionError):
        await client.produce(b"x")
    assert client.stats.retries == 2
    await dead.aclose()


def _unused_port() -> int:
    from runner.redis_server import free_port

    return free_port()


# ------------------------------------------------------------------------------------------------ processes


class Workers:
    """Spawned worker processes with their logs; whatever is still running at the end is SIGKILLed by pid."""

    def __init__(self, tmp: Path, url: str, run: str) -> None:
        self.tmp, self.url, self.run = tmp, url, run
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_file = tmp / "stop"

    def spawn(self, role: str, name: str, *flags: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, str(WORKER), role, "--url", self.url, "--run", self.run, "--name", name]
        cmd += ["--stop-file", str(self.stop_file), *flags]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.tmp / f"{name}.stdout", "wb") as out, open(self.tmp / f"{name}.stderr", "wb") as err:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        return self.procs[name]

    def wait_ok(self, name: str, timeout: float = 60) -> dict[str, int]:
        rc = self.procs[name].wait(timeout)
        assert rc == 0, f"{name} exited {rc}: {(self.tmp / f'{name}.stderr').read_text()[-2000:]}"
        return json.loads((self.tmp / f"{name}.stdout").read_text().strip().splitlines()[-1])

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, run_name: str) -> Iterator[Workers]:
    w = Workers(tmp_path, redis_url, run_name)
    try:
        yield w
    finally:
        w.kill_all()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def produced(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """(entry id -> prompt id, entry id -> poison payload) from a producer's record."""
    good, poison = {}, {}
    for line in path.read_text().splitlines():
        entry_id, label, data = (line.split(" ") + [""])[:3]
        if label == "POISON":
            poison[entry_id] = bytes.fromhex(data)
        else:
            good[entry_id] = label
    return good, poison


def acklog(r: redis.Redis, run: str) -> list[tuple[str, str, str]]:
    """(consumer, entry id, prompt id) for every acknowledgement that took effect, in order."""
    rows = r.xrange(run_key(run, "acklog"))
    return [tuple(f[b"d"].decode().split(" ")) for _, f in rows]  # type: ignore[misc]


def test_many_processes_deliver_every_message_exactly_once(workers: Workers, redis_url: str, run_name: str) -> None:
    r = redis.Redis.from_url(redis_url)
    spec = StreamSpec(run_name, PROMPTS)
    r.xgroup_create(str(spec), "rollout", "0", mkstream=True)
    hang_file = workers.tmp / "hung.json"
    workers.spawn("consume", "victim", "--hang-after", "200", "--hang-file", str(hang_file))
    for k in range(3):
        workers.spawn("consume", f"survivor{k}")
    for k in range(2):
        workers.spawn("produce", f"prod{k}", "--count", "10000", "--poison", "5", "--batch", "100",
                      "--out", str(workers.tmp / f"prod{k}.ids"))  # fmt: skip

    wait_until(hang_file.exists, 45, "the victim to hold a batch")
    time.sleep(0.1)  # the file is written before the sleep; let the write finish
    held = json.loads(hang_file.read_text())
    pending_victim = {
        row["message_id"].decode() for row in r.xpending_range(str(spec), "rollout", "-", "+", 10_000, "victim")
    }
    assert held and set(held) <= pending_victim
    os.kill(workers.procs["victim"].pid, signal.SIGKILL)
    workers.procs["victim"].wait()

    for k in range(2):
        workers.wait_ok(f"prod{k}")
    good: dict[str, str] = {}
    poison: dict[str, bytes] = {}
    for k in range(2):
        g, p = produced(workers.tmp / f"prod{k}.ids")
        good.update(g)
        poison.update(p)
    assert len(good) == 20_000 and len(poison) == 10

    dead = run_key(run_name, DEADLETTER)
    wait_until(lambda: r.xlen(run_key(run_name, "acklog")) >= 20_000 and r.xlen(dead) >= 10, 60, "all acks")
    workers.stop_file.touch()
    stats = {name: workers.wait_ok(name) for name in ("survivor0", "survivor1", "survivor2")}

    log = acklog(r, run_name)
    counts = Counter(entry_id for _, entry_id, _ in log)
    assert set(counts) == set(good) and max(counts.values()) == 1  # every message acknowledged exactly once
    assert all(good[entry_id] == prompt_id for _, entry_id, prompt_id in log)
    by_id = {entry_id: consumer for consumer, entry_id, _ in log}
    assert all(by_id[i].startswith("survivor") for i in held)  # the victim's batch was claimed by survivors
    assert any(consumer == "victim" for consumer, _, _ in log)  # it did work before it died
    assert r.xpending(str(spec), "rollout")["pending"] == 0
    letters = [DeadLetter.from_bytes(f[b"d"]) for _, f in r.xrange(dead)]
    assert {d.entry_id: d.fields["d"] for d in letters} == poison  # poison, and nothing else, is dead-lettered
    assert sum(s["dead_lettered"] for s in stats.values()) <= 10
    r.close()


def test_redis_crash_and_restart_loses_no_acknowledged_message(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "redis", appendfsync="always").start()
    workers = Workers(tmp_path, server.url, "restart")
    try:
        r = redis.Redis.from_url(server.url)
        key = run_key("restart", PROMPTS)
        r.xgroup_create(key, "rollout", "0", mkstream=True)
        for k in range(2):
            workers.spawn("consume", f"c{k}", "--claim-idle-ms", "1000", "--batch", "20")
            workers.spawn("produce", f"prod{k}", "--count", "2000", "--batch", "10", "--pace-s", "0.01",
                          "--out", str(tmp_path / f"prod{k}.ids"))  # fmt: skip
        ids_file = tmp_path / "prod0.ids"
        wait_until(lambda: ids_file.exists() and len(ids_file.read_text().splitlines()) >= 200, 30, "producing")
        assert len(ids_file.read_text().splitlines()) < 2000, "the crash must happen mid-run"
        server.restart(crash=True)  # SIGKILL: only the AOF (fsync always) can keep what was acknowledged
        r = redis.Redis.from_url(server.url)

        retries = sum(workers.wait_ok(f"prod{k}")["retries"] for k in range(2))
        good: dict[str, str] = {}
        for k in range(2):
            good.update(produced(tmp_path / f"prod{k}.ids")[0])
        assert len(good) == 4000
        wait_until(lambda: set(good) <= {i for _, i, _ in acklog(r, "restart")}, 60, "consumers to catch up")
        workers.stop_file.touch()
        retries += sum(workers.wait_ok(f"c{k}")["retries"] for k in range(2))

        in_stream = {i.decode() for i, _ in r.xrange(key)}
        assert set(good) <= in_stream  # every id a producer saw acknowledged survived the crash
        assert {p for _, _, p in acklog(r, "restart")} >= set(good.values())
        assert retries > 0  # the clients really went through the outage
        r.close()
    finally:
        workers.kill_all()
        server.close()


async def test_trim_removes_only_entries_every_group_acknowledged(redis_client: Any, run_name: str) -> None:
    from services.stream_upkeep import trim_acknowledged

    key = f"dipo:{run_name}:trim"
    assert await trim_acknowledged(redis_client, key, 0) == 0  # no stream
    ids = [await redis_client.xadd(key, {"d": b"x" * 100}) for _ in range(300)]
    assert await trim_acknowledged(redis_client, key, 0) == 0  # no consumer group: never trimmed
    for group in ("a", "b"):
        await redis_client.xgroup_create(key, group, "0")
    # group a read 250 and acknowledged all but #100; group b read 280 and acknowledged them all
    got_a = await redis_client.xreadgroup("a", "c", {key: ">"}, count=250)
    await redis_client.xack(key, "a", *[i for i, _ in got_a[0][1] if i != ids[100]])
    got_b = await redis_client.xreadgroup("b", "c", {key: ">"}, count=280)
    await redis_client.xack(key, "b", *[i for i, _ in got_b[0][1]])
    # retained for an hour: nothing goes
    await trim_acknowledged(redis_client, key, 3600)
    assert await redis_client.xlen(key) == 300
    await trim_acknowledged(redis_client, key, 0)
    left = [i for i, _ in await redis_client.xrange(key)]
    assert ids[100] in left and left == ids[ids.index(left[0]) :]  # a contiguous tail from at most #100
    await redis_client.xack(key, "a", ids[100])
    await trim_acknowledged(redis_client, key, 0)
    left = [i for i, _ in await redis_client.xrange(key)]
    assert set(ids[250:]) <= set(left)  # undelivered to a: kept
    assert len(left) < 300 - 100
