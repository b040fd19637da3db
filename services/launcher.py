"""``dipo run``: start Redis, the learner, the reward services and the rollout servers as child processes, and
supervise them until training is done.

The launcher never imports the components (they pull torch and vLLM, ``services`` must not): every component is a
``sys.executable -m <package>`` child described by a :class:`ChildSpec`, which :class:`Supervisor` runs. Each child
leads its own session, so a Ctrl-C on the terminal reaches only the launcher, which then stops the children in
order: the learner first (it checkpoints), then the rollout servers, then the reward services, then Redis.
Processes are signalled by pid (and by the process group each child leads), never by name. Children on CUDA get GPUs
of their own (``services/gpus.py``); a learner on several GPUs runs under torchrun.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

from rich.console import Console

from services.config import RunConfig, load_config, write_resolved_config
from services.gpus import GpuLayout, GpuLayoutError, GpuLister, plan_gpus, visible_gpus
from services.redis_server import LocalRedis, free_port

log = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Restart policy of crashed children. The cap counts restarts over the child's whole life; the backoff exponent
# resets once a child has run for STABLE_AFTER_S, so a rare crash late in a long run waits only BACKOFF_BASE_S.
MAX_RESTARTS = 5
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


class LaunchError(RuntimeError):
    """The run cannot start: its folder is in use, or a prerequisite is missing."""


@dataclass(frozen=True)
class RestartPolicy:
    """When and how a crashed child is started again."""

    max_restarts: int = MAX_RESTARTS
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
        if child.restarts >= policy.max_restarts or code in policy.fatal_exit_codes:
            child.state = "failed"
            log.error("%s exited with code %d and is not restarted (%d restarts so far); see %s",
                      spec.name, code, child.restarts, self.log_dir / f"{spec.name}.log")  # fmt: skip
            self.outcome = EXIT_FAILED
            return
        delay = policy.delay(child.quick_failures)
        child.quick_failures += 1
        child.state = "restarting"
        child.restart_at = now + delay
        log.warning("%s exited with code %d; restart %d/%d in %.1fs",
                    spec.name, code, child.restarts + 1, policy.max_restarts, delay)  # fmt: skip

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


# ---------------------------------------------------------------------------------------------------------------------
# the run


def has_checkpoints(run_dir: Path) -> bool:
    """Whether the run folder holds a learner checkpoint (a ``checkpoints/step-*`` folder or a ``latest`` file)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return False
    return (root / "latest").is_file() or any(p.is_dir() and p.name.startswith("step-") for p in root.iterdir())


def prepare_run_dir(cfg: RunConfig, *, resume: bool) -> Path:
    """Create the run folder; refuse one with checkpoints unless resuming; set aside a fresh run's leftovers."""
    run_dir = cfg.resolved_run_dir
    if has_checkpoints(run_dir) and not resume:
        raise LaunchError(
            f"{run_dir} already holds checkpoints of an earlier run: pass --resume to continue it, "
            f"or choose another folder with --set run_dir=... (or another --set name=...)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    leftovers = [run_dir / "metrics.jsonl", run_dir / "redis"]
    if not resume and any(p.exists() for p in leftovers):
        # an earlier attempt died before its first checkpoint: its streams and metrics would mix with this run's
        aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in leftovers:
            if path.exists():
                shutil.move(str(path), str(aside / path.name))
        log.warning("moved the leftovers of an earlier attempt without checkpoints to %s", aside)
    (run_dir / "logs").mkdir(exist_ok=True)
    return run_dir


def _thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


class _PortPicker:
    """Distinct ports for the children: a configured port P gives replica i the port P + i, 0 a free one."""

    def __init__(self, pick: Callable[[], int]) -> None:
        self.pick = pick
        self.used: set[int] = set()

    def __call__(self, configured: int, index: int) -> int:
        chosen = configured + index if configured else self.pick()
        while not configured and chosen in self.used:
            chosen = self.pick()
        self.used.add(chosen)
        return chosen


# ---------------------------------------------------------------------------------------------------------------------
# GPUs


def _plan_gpus(cfg: RunConfig, list_gpus: GpuLister) -> GpuLayout:
    try:
        return plan_gpus(cfg, list_gpus)
    except GpuLayoutError as exc:
        raise LaunchError(str(exc)) from exc


def torchrun_argv(python: str, nproc: int) -> list[str]:
    """``torchrun`` on this node with ``nproc`` ranks, before its script (``-m learner``) and the script's arguments.

    ``--standalone`` picks a free rendezvous port, so runs side by side do not collide. On SIGTERM torchrun signals
    every rank; the learner's rank 0 checkpoints and then releases the others (they ignore the signal), and ranks
    still running after ``TORCHRUN_SHUTDOWN_S`` are killed. Each rank dies with torchrun (``learner.distributed``),
    so a SIGKILL of torchrun by the launcher leaves no rank behind.
    """
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={TORCHRUN_SHUTDOWN_S}"]  # fmt: skip


def _gpu_env(gpus: Sequence[str]) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}


# ---------------------------------------------------------------------------------------------------------------------
# the children


def build_child_specs(
    cfg: RunConfig,
    config_path: Path | None,
    overrides: Sequence[str],
    *,
    redis_url: str,
    resume: bool = False,
    python: str = sys.executable,
    pick_port: Callable[[], int] = free_port,
    gpus: GpuLayout | None = None,
    list_gpus: GpuLister = visible_gpus,
) -> list[ChildSpec]:
    """The learner, ``reward.replicas`` reward services and ``rollout.workers`` rollout servers of a run.

    ``gpus`` is the GPU layout; None plans it with :func:`plan_gpus` over the GPUs ``list_gpus`` returns.
    """
    layout = gpus if gpus is not None else _plan_gpus(cfg, list_gpus)
    port = _PortPicker(pick_port)
    common = [f"--config={Path(config_path).resolve()}"] if config_path is not None else []
    for item in overrides:
        common += ["--set", item]
    env = {"PYTHONUNBUFFERED": "1", "DIPO_REDIS__URL": redis_url}
    if cfg.redis.password:
        env["DIPO_REDIS__PASSWORD"] = cfg.redis.password

    learner_port = port(cfg.learner.server.port, 0)
    launcher = torchrun_argv(python, len(layout.learner)) if len(layout.learner) > 1 else [python]
    learner_argv = [*launcher, "-m", "learner", *common, "--set", f"learner.server.port={learner_port}"]
    specs = [
        ChildSpec(
            "learner",
            learner_argv + (["--resume"] if resume else []),
            env | _thread_env(cfg.learner.torch_threads) | _gpu_env(layout.learner),
            RestartPolicy(restart_argv=tuple(learner_argv + ["--resume"])),
            primary=True,
            stop_rank=STOP_RANK_LEARNER,
            stop_grace_s=LEARNER_STOP_GRACE_S,
        )
    ]
    for package, section, count, threads, rank in (
        ("reward_service", "reward", cfg.reward.replicas, 1, STOP_RANK_REWARD),
        ("rollout_server", "rollout", cfg.rollout.workers, cfg.rollout.torch_threads, STOP_RANK_ROLLOUT),
    ):
        configured = cfg.reward.server.port if section == "reward" else cfg.rollout.server.port
        for i in range(count):
            name = f"{section}-{i}"
            argv = [python, "-m", package, *common, "--set", f"{section}.server.port={port(configured, i)}",
                    f"--port-file={cfg.resolved_run_dir / 'ports' / f'{name}.port'}"]  # fmt: skip
            gpu = _gpu_env(layout.rollout[i : i + 1]) if section == "rollout" else {}
            specs.append(ChildSpec(name, argv, env | _thread_env(threads) | gpu, RestartPolicy(), stop_rank=rank))
    return specs


def _start_redis(cfg: RunConfig, run_dir: Path) -> LocalRedis | None:
    if cfg.redis.url is not None:
        return None
    try:
        server = LocalRedis(run_dir / "redis", appendfsync=cfg.redis.appendfsync, password=cfg.redis.password)
    except FileNotFoundError as exc:
        raise LaunchError(f"{exc}, or set redis.url to a running server") from exc
    try:
        return server.start()
    except (RuntimeError, TimeoutError) as exc:
        raise LaunchError(f"the local redis-server did not start ({exc}); see {server.log_path}") from exc


def launch(
    config_path: Path,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    panel: bool = True,
    console: Console | None = None,
) -> int:
    """Run a whole training job locally; returns 0 when training finished, non-zero otherwise."""
    from services.log import setup_logging

    console = console or Console()
    cfg = load_config(config_path, overrides)
    setup_logging(cfg.log_level, "launcher")
    run_dir = prepare_run_dir(cfg, resume=resume)
    _log_to_file(run_dir / "logs" / "launcher.log")
    gpus = _plan_gpus(cfg, visible_gpus)  # before Redis: a node without enough GPUs fails at once
    if gpus.learner or gpus.rollout:
        log.info("GPU layout: %s", gpus.describe())
    redis_server = _start_redis(cfg, run_dir)
    try:
        redis_url = redis_server.url if redis_server is not None else str(cfg.redis.url)
        cfg.redis.url = redis_url
        write_resolved_config(cfg, run_dir)
        specs = build_child_specs(cfg, config_path, overrides, redis_url=redis_url, resume=resume, gpus=gpus)
        supervisor = Supervisor(specs, run_dir / "logs", redis=redis_server)
        code = _supervise(supervisor, cfg, run_dir, console, live=panel and console.is_terminal)
    finally:
        if redis_server is not None and redis_server.is_running():
            redis_server.stop()  # only reached running when the supervisor never got to stop it
    _final_report(run_dir, console)
    _print_outcome(console, code, supervisor.statuses())
    return code


def _log_to_file(path: Path) -> None:
    """Also write the launcher's log to the run folder (known only once the folder is accepted)."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)


def _supervise(supervisor: Supervisor, cfg: RunConfig, run_dir: Path, console: Console, *, live: bool) -> int:
    from services.panel import RunMonitor, open_display, route_logging_to

    restore = supervisor.install_signal_handlers()
    monitor = RunMonitor(run_dir, cfg, str(cfg.redis.url), supervisor.statuses)
    log.info("run %s in %s: %d children", cfg.name, run_dir, len(supervisor.children))
    try:
        if live:
            route_logging_to(console)  # plain stderr lines would tear the live panel
        with open_display(monitor, console, live=live) as display:
            return supervisor.run(on_tick=display.tick)
    finally:
        restore()
        monitor.close()


def _final_report(run_dir: Path, console: Console) -> None:
    from services.report import build_report

    try:
        path = build_report(run_dir)
    except Exception:  # a broken plot must not hide the run's outcome; the error is in the launcher log
        log.exception("could not build the report; rebuild it with `dipo report %s`", run_dir)
        return
    console.print(f"report: {path}")


def _print_outcome(console: Console, code: int, statuses: list[ChildStatus]) -> None:
    words: dict[int, str] = {EXIT_DONE: "training finished", EXIT_INTERRUPTED: "interrupted", EXIT_FAILED: "failed"}
    restarts = ", ".join(f"{s.name} x{s.restarts}" for s in statuses if s.restarts) or "none"
    console.print(f"dipo run: {words.get(code, f'exit {code}')} (exit code {code}); restarts: {restarts}")
