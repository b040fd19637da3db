"""Process supervision for ``dipo run`` and ``dipo chaos``: start children, restart crashed ones, stop them in order.

Every child is a ``sys.executable -m <package>`` process described by a :class:`ChildSpec`. Each leads its own
session, so a Ctrl-C on the terminal reaches only the launcher, which then stops the children by stop rank: the
learner first (it checkpoints), then the rollout servers, then the reward services, then Redis. Processes are
signalled by pid (and by the process group each child leads), never by name.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

from runner.redis_server import LocalRedis

log = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Restart policy of crashed children. The cap counts the restarts of the last RESTART_WINDOW_S, so a long run that
# crashes now and then is never given up on while a crash loop is; the backoff exponent resets once a child has run
# for STABLE_AFTER_S, so a rare crash late in a long run waits only BACKOFF_BASE_S.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 3600.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 300.0
# Exit status 2 is argparse's usage error and the learner's "run folder in use": restarting cannot help.
FATAL_EXIT_CODES = frozenset({2})
REDIS_MAX_RESTARTS = 3

# How long a child may take to stop after SIGTERM before it is killed: the learner writes a checkpoint first.
LEARNER_STOP_GRACE_S = 300.0
WORKER_STOP_GRACE_S = 30.0
POLL_INTERVAL_S = 0.2
# A learner on several GPUs runs under torchrun, which forwards the SIGTERM to every rank and SIGKILLs the ranks still
# running after this long: shorter than LEARNER_STOP_GRACE_S, so torchrun cleans up its ranks before it is killed.
TORCHRUN_SHUTDOWN_S = 270

# Shutdown order: lower ranks are stopped (and waited for) first.
STOP_RANK_LEARNER = 0
STOP_RANK_ROLLOUT = 1
STOP_RANK_REWARD = 2

ChildState = Literal["pending", "running", "restarting", "stopping", "exited", "stopped", "failed"]


@dataclass(frozen=True)
class RestartPolicy:
    """When and how a crashed child is started again."""

    max_restarts: int = MAX_RESTARTS
    """Restarts allowed within ``window_s``; one more crash inside the window fails the run."""
    window_s: float = RESTART_WINDOW_S
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float = BACKOFF_MAX_S
    stable_after_s: float = STABLE_AFTER_S
    restart_argv: tuple[str, ...] | None = None  # the learner's restarts add --resume
    fatal_exit_codes: frozenset[int] = FATAL_EXIT_CODES

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (0-based) of a quickly failing child."""
        return float(min(self.backoff_max_s, self.backoff_base_s * 2**attempt))


@dataclass(frozen=True)
class ChildSpec:
    """One supervised child process: its command line, the environment it adds, and its restart policy."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    primary: bool = False  # the learner: its clean exit ends the run
    stop_rank: int = STOP_RANK_ROLLOUT
    stop_grace_s: float = WORKER_STOP_GRACE_S


@dataclass(frozen=True)
class ChildStatus:
    """What the panel shows of one child."""

    name: str
    state: str
    pid: int | None
    restarts: int
    exit_code: int | None


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    state: ChildState = "pending"
    restarts: int = 0
    """Restarts over the child's whole life (what the panel shows)."""
    restart_times: deque[float] = field(default_factory=deque)
    """When the restarts of the current window happened (monotonic seconds)."""
    quick_failures: int = 0
    exit_code: int | None = None
    started_at: float = 0.0
    restart_at: float = 0.0


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group a child leads; it may be gone already."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, without reaping it (a zombie keeps its pid and process group reserved)."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll() is not None
    return info is not None


class Supervisor:
    """Run a set of children: restart crashed ones, end the run when the primary exits 0, stop all in order.

    ``run()`` blocks until the run is over and returns the exit code; ``request_stop()`` (from a signal handler)
    asks for an orderly shutdown, and a second call kills whatever is still running.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        log_dir: Path,
        *,
        cwd: Path | None = None,
        redis: LocalRedis | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
        if sum(s.primary for s in specs) > 1:
            raise ValueError("at most one child can be primary (the learner)")
        self.children = [_Child(spec) for spec in specs]
        self.log_dir = Path(log_dir)
        self.cwd = cwd
        self.redis = redis
        self.redis_restarts = 0
        self.poll_interval_s = poll_interval_s
        self.outcome: int | None = None
        self.stop_requested = False
        self.force = False
        self._started = False

    # ------------------------------------------------------------------ processes

    def _spawn(self, child: _Child, argv: Sequence[str]) -> None:
        spec = child.spec
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{spec.name}.log").open("ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(
                f"--- {stamp} launcher: start {spec.name} (restart {child.restarts}): {list(argv)}\n".encode()
            )
            log_file.flush()
            # a new session per child: a terminal's Ctrl-C reaches only the launcher, which orders the shutdown
            child.proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env}, cwd=self.cwd, start_new_session=True,
            )  # fmt: skip
        child.state = "running"
        child.exit_code = None
        child.started_at = time.monotonic()
        log.info("started %s, pid %d", spec.name, child.proc.pid)

    def _reap(self, child: _Child) -> int | None:
        """The child's exit code once it has exited (then also kill what is left of its process group)."""
        proc = child.proc
        if proc is None or not _has_exited(proc):
            return None
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGKILL)  # orphans it left behind (verifier pools, loader workers)
        code = proc.wait()
        child.exit_code = code
        return code

    # ------------------------------------------------------------------ supervision

    def start(self) -> None:
        """Start every child."""
        if self._started:
            raise RuntimeError("the supervisor was started already")
        self._started = True
        for child in self.children:
            self._spawn(child, child.spec.argv)

    def poll(self) -> int | None:
        """One supervision pass: reap exited children, restart due ones; the run's exit code once it is over."""
        now = time.monotonic()
        for child in self.children:
            if child.state == "running":
                code = self._reap(child)
                if code is not None:
                    self._on_exit(child, code, now)
            elif child.state == "restarting" and now >= child.restart_at:
                child.restarts += 1
                child.restart_times.append(now)
                policy = child.spec.restart_policy
                self._spawn(child, policy.restart_argv or child.spec.argv)
        self._check_redis()
        return self.outcome

    def _on_exit(self, child: _Child, code: int, now: float) -> None:
        spec, policy = child.spec, child.spec.restart_policy
        if spec.primary and code == 0:
            child.state = "exited"
            log.info("%s finished (exit 0): stopping the run", spec.name)
            self.outcome = EXIT_DONE
            return
        if now - child.started_at >= policy.stable_after_s:
            child.quick_failures = 0
        while child.restart_times and child.restart_times[0] < now - policy.window_s:
            child.restart_times.popleft()
        if len(child.restart_times) >= policy.max_restarts or code in policy.fatal_exit_codes:
            child.state = "failed"
            log.error("%s exited with code %d and is not restarted (%d restarts in the last %.0fs, %d in all); see %s",
                      spec.name, code, len(child.restart_times), policy.window_s, child.restarts,
                      self.log_dir / f"{spec.name}.log")  # fmt: skip
            self.outcome = EXIT_FAILED
            return
        delay = policy.delay(child.quick_failures)
        child.quick_failures += 1
        child.state = "restarting"
        child.restart_at = now + delay
        log.warning("%s exited with code %d; restart %d/%d of the window in %.1fs",
                    spec.name, code, len(child.restart_times) + 1, policy.max_restarts, delay)  # fmt: skip

    def _check_redis(self) -> None:
        if self.redis is None or self.redis.is_running() or self.outcome is not None:
            return
        if self.redis_restarts >= REDIS_MAX_RESTARTS:
            log.error("redis-server died %d times; giving up", self.redis_restarts + 1)
            self.outcome = EXIT_FAILED
            return
        self.redis_restarts += 1
        log.warning("redis-server died; restarting it on port %d (%d/%d)",
                    self.redis.port, self.redis_restarts, REDIS_MAX_RESTARTS)  # fmt: skip
        try:
            self.redis.restart(crash=True)  # same port and folder: the AOF is reloaded, clients reconnect
        except (RuntimeError, TimeoutError) as exc:
            log.error("redis-server did not come back: %s", exc)
            self.outcome = EXIT_FAILED

    def request_stop(self) -> None:
        """Ask for an orderly shutdown; a second request kills what is left (safe to call from a signal handler)."""
        if self.stop_requested:
            self.force = True
        self.stop_requested = True

    def run(self, on_tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> int:
        """Start (if needed), supervise until the run is over or a stop is requested, shut down; the exit code."""
        if not self._started:
            self.start()
        next_tick = 0.0
        try:
            try:
                while self.poll() is None and not self.stop_requested:
                    if on_tick is not None and time.monotonic() >= next_tick:
                        on_tick()
                        next_tick = time.monotonic() + tick_s
                    time.sleep(self.poll_interval_s)
            finally:
                self.stop_children()
            if on_tick is not None:
                on_tick()  # the final state, while Redis still answers
        finally:
            self.stop_redis()
        if self.outcome is None:
            self.outcome = EXIT_INTERRUPTED if self.stop_requested else EXIT_FAILED
        return self.outcome

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Stop every child, then Redis if the launcher owns it."""
        self.stop_children()
        self.stop_redis()

    def stop_children(self) -> None:
        """Stop the children by stop rank: SIGTERM, wait up to their grace period, then SIGKILL their group."""
        for rank in sorted({c.spec.stop_rank for c in self.children}):
            self._stop_group([c for c in self.children if c.spec.stop_rank == rank])

    def stop_redis(self) -> None:
        """Stop the Redis server the launcher started (it flushes its AOF)."""
        if self.redis is not None:
            self.redis.stop()

    def _stop_group(self, group: list[_Child]) -> None:
        waiting: list[_Child] = []
        for child in group:
            if child.state == "running" and child.proc is not None:
                if self._reap(child) is not None:
                    child.state = "exited"  # it ended on its own just before the shutdown
                    continue
                log.info("stopping %s (pid %d)", child.spec.name, child.proc.pid)
                os.kill(child.proc.pid, signal.SIGTERM)
                child.state = "stopping"
                waiting.append(child)
            elif child.state in ("pending", "restarting"):
                child.state = "stopped"
        if not waiting:
            return
        deadline = time.monotonic() + max(c.spec.stop_grace_s for c in waiting)
        while waiting and time.monotonic() < deadline and not self.force:
            waiting = [c for c in waiting if self._reap(c) is None]
            if waiting:
                time.sleep(min(self.poll_interval_s, 0.05))
        for child in waiting:
            if self._reap(child) is None and child.proc is not None:
                log.warning("%s (pid %d) did not stop in time; killing it", child.spec.name, child.proc.pid)
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.exit_code = child.proc.wait()
        for child in group:
            if child.state == "stopping":
                child.state = "stopped"

    # ------------------------------------------------------------------ inspection

    def statuses(self) -> list[ChildStatus]:
        """The state of every child (and of the Redis server the launcher owns), for the panel."""
        rows = [
            ChildStatus(c.spec.name, c.state, c.proc.pid if c.proc else None, c.restarts, c.exit_code)
            for c in self.children
        ]
        if self.redis is not None:
            running = self.redis.is_running()
            rows.append(ChildStatus("redis", "running" if running else "stopped",
                                    self.redis.pid if running else None, self.redis_restarts, None))  # fmt: skip
        return rows

    def install_signal_handlers(self) -> Callable[[], None]:
        """Turn SIGINT and SIGTERM into ``request_stop``; returns a function that restores the old handlers."""

        def handler(signum: int, frame: FrameType | None) -> None:
            log.warning("%s received: stopping the run (again to kill)", signal.Signals(signum).name)
            self.request_stop()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore
