"""Start a private ``redis-server`` on a free local port, for tests, benchmarks and single-machine runs."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

AppendFsync = Literal["always", "everysec", "no"]
_SYSTEM_REDIS_PORT = 6379


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on host (never the system Redis port)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port != _SYSTEM_REDIS_PORT:
            return port


class LocalRedis:
    """A ``redis-server`` child process bound to 127.0.0.1 with AOF on, stopped by its pid.

    ``restart()`` reuses the same port and folder, so the append-only file is reloaded and clients that retry
    reconnect to the same URL.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        port: int | None = None,
        password: str | None = None,
        appendfsync: AppendFsync = "everysec",
        maxmemory_mb: int = 0,
        start_timeout_s: float = 10.0,
        stop_grace_s: float = 5.0,
        executable: str | None = None,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be 'always', 'everysec' or 'no', got {appendfsync!r}")
        if port == _SYSTEM_REDIS_PORT:
            raise ValueError("port 6379 belongs to the machine's own Redis; leave port unset to pick a free one")
        binary = executable or shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH: install Redis 7 (apt-get install redis-server)")
        self.executable = binary
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dipo-redis-")
            directory = self._tmp.name
        # absolute: redis-server changes into --dir before it opens --logfile, so a relative path would miss
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # another process may grab a probed port before the server binds it; only a port we picked may change
        self._may_repick_port = port is None
        self.password = password
        self.appendfsync = appendfsync
        if maxmemory_mb < 0:
            raise ValueError(f"maxmemory_mb must be >= 0 (0: no limit), got {maxmemory_mb}")
        self.maxmemory_mb = maxmemory_mb
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port/0``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (raises if it is not running)."""
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        """The server's log file, inside its folder."""
        return self.dir / "redis.log"

    def is_running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        cmd = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.maxmemory_mb:
            # noeviction: streams must never lose entries to eviction; at the limit writes are refused (OOM), which
            # every client retries as an outage while the learner's trims free memory.
            cmd += ["--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        return cmd

    def start(self) -> LocalRedis:
        """Start the server and wait until it answers PING."""
        if self.is_running():
            raise RuntimeError(f"redis-server already running with pid {self.pid}")
        for attempt in range(3):
            try:
                return self._start_once()
            except RuntimeError:
                if not self._may_repick_port or attempt == 2 or "Address already in use" not in self._log_tail():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> LocalRedis:
        # a new session keeps a terminal's Ctrl-C from reaching the server before the owner stops it
        self._proc = subprocess.Popen(
            self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self._may_repick_port = False  # clients now know this port: restarts must keep it
        log.info("redis-server pid %d on port %d in %s", self._proc.pid, self.port, self.dir)
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        # redis-py's default retries back off for seconds per attempt; this loop polls on its own
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {self._proc.returncode}: {self._log_tail()}")
                try:
                    # a PING could be answered by whoever else holds the port: make sure it is our process
                    info = cast(dict[str, Any], client.info("server"))
                    if info.get("process_id") == self._proc.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError while the AOF loads
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"redis-server did not answer PING in {self.start_timeout_s}s: {self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM the server (it flushes the AOF), then SIGKILL after the grace period."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM for %.1fs; killing", self._proc.pid, self.stop_grace_s)
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server without letting it flush: a crash, for fault tests."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def restart(self, *, crash: bool = False) -> LocalRedis:
        """Stop (or kill, with crash=True) and start again on the same port and folder, reloading the AOF."""
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove the temporary folder if this object created it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
