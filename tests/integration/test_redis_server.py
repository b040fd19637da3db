"""LocalRedis: a private redis-server that starts, authenticates, keeps data across restarts and stops by pid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runner.redis_server import LocalRedis


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_answers_on_a_private_port_and_stop_leaves_no_process() -> None:
    with LocalRedis() as server:
        pid, folder = server.pid, server.dir
        assert server.port != 6379 and pid_alive(pid)
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1" and config["appendonly"] == "yes" and config["save"] == ""
        assert config["appendfsync"] == "everysec" and config["dir"] == str(folder)
        client.close()
        assert server.log_path.exists()
    assert not pid_alive(pid)
    assert not folder.exists()  # the temporary folder it created is removed
    with pytest.raises(RuntimeError):
        _ = server.pid


def test_password_is_required(tmp_path: Path) -> None:
    with LocalRedis(tmp_path, password="pw", appendfsync="always") as server:
        assert "pw@" in server.url
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0)).ping()
        assert redis.Redis.from_url(server.url).config_get("appendfsync")["appendfsync"] == "always"
    assert tmp_path.exists()  # a given folder is the caller's and stays


@pytest.mark.parametrize("crash", [False, True])
def test_restart_keeps_port_folder_and_data(tmp_path: Path, crash: bool) -> None:
    server = LocalRedis(tmp_path, appendfsync="always").start()
    try:
        port, first_pid = server.port, server.pid
        client = redis.Redis.from_url(server.url)
        client.xadd("dipo:r:prompts", {"d": b"payload"})
        client.set("k", "v")
        client.close()
        server.restart(crash=crash)
        assert server.port == port and server.pid != first_pid and not pid_alive(first_pid)
        client = redis.Redis.from_url(server.url)
        assert client.get("k") == b"v"
        assert [f for _, f in client.xrange("dipo:r:prompts")] == [{b"d": b"payload"}]
        client.close()
    finally:
        server.stop()
    assert not server.is_running()


def test_kill_is_immediate_and_stop_after_kill_is_harmless(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path).start()
    pid = server.pid
    server.kill()
    assert not pid_alive(pid) and not server.is_running()
    server.stop()


def test_bad_arguments_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="6379"):
        LocalRedis(tmp_path, port=6379)
    with pytest.raises(ValueError, match="appendfsync"):
        LocalRedis(tmp_path, appendfsync="sometimes")  # type: ignore[arg-type]
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="redis-server is not on PATH"):
        LocalRedis(tmp_path)


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "a") as first:
        second = LocalRedis(tmp_path / "b", port=first.port, start_timeout_s=5)
        with pytest.raises(RuntimeError, match="exited"):
            second.start()
        assert not second.is_running()


def test_a_relative_folder_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dipo run` passes runs/<name>/redis: redis-server changes into --dir before it opens --logfile."""
    monkeypatch.chdir(tmp_path)
    server = LocalRedis(Path("runs/quick/redis")).start()
    try:
        assert redis.Redis.from_url(server.url).ping()
        assert (tmp_path / "runs/quick/redis/redis.log").is_file()
    finally:
        server.stop()
