"""``dipo run``: start Redis, the learner, the reward services and the rollout servers as child processes, and
supervise them until training is done.

The launcher never imports the components (they pull torch and vLLM): every component is a
``sys.executable -m <package>`` child described by a :class:`~runner.supervisor.ChildSpec`, which
:class:`~runner.supervisor.Supervisor` runs and stops in order. Children on CUDA get GPUs of their own
(``runner/gpus.py``); a learner on several GPUs runs under torchrun.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from runner.gpus import GpuLayout, GpuLayoutError, GpuLister, plan_gpus, visible_gpus
from runner.panel import RunMonitor, open_display, route_logging_to
from runner.redis_server import LocalRedis, free_port
from runner.report import build_report
from runner.supervisor import (
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    LEARNER_STOP_GRACE_S,
    STOP_RANK_LEARNER,
    STOP_RANK_REWARD,
    STOP_RANK_ROLLOUT,
    TORCHRUN_SHUTDOWN_S,
    ChildSpec,
    ChildStatus,
    RestartPolicy,
    Supervisor,
)
from services.config import RunConfig, env_name, load_config, split_secret_overrides, write_resolved_config
from services.contracts import RunFolder
from services.log import setup_logging

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The run cannot start: its folder is in use, or a prerequisite is missing."""


# ---------------------------------------------------------------------------------------------------------------------
# the run


def has_checkpoints(run_dir: Path) -> bool:
    """Whether the run folder holds a learner checkpoint (a ``checkpoints/step-*`` folder or a ``latest`` file)."""
    root = RunFolder(Path(run_dir)).checkpoints
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
    run_dir.chmod(0o700)  # it holds the Redis data, the logs and the API token: this user's only
    leftovers = [RunFolder(run_dir).metrics, RunFolder(run_dir).redis]
    if not resume and any(p.exists() for p in leftovers):
        # an earlier attempt died before its first checkpoint: its streams and metrics would mix with this run's
        aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in leftovers:
            if path.exists():
                shutil.move(str(path), str(aside / path.name))
        log.warning("moved the leftovers of an earlier attempt without checkpoints to %s", aside)
    RunFolder(run_dir).logs.mkdir(exist_ok=True)
    return run_dir


API_TOKEN_FILE = "api_token"
"""In the run folder (0600): the API token `dipo run` generated for the rollout and reward servers' POST endpoints."""


def fill_run_secrets(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Give a run the secrets its configuration left out: a password for the local redis-server `dipo run` starts,
    and one API token for the rollout and reward servers (written to ``<run>/api_token``, mode 0600, for the user's
    own calls). They reach the children through the environment. Returns what was generated.

    A resumed run gets new ones: the Redis password is set on each start of the server, and nothing outlives a
    run but its folder.
    """
    generated = []
    if cfg.redis.url is None and not cfg.redis.password:
        cfg.redis.password = secrets.token_urlsafe(24)
        generated.append("a Redis password")
    servers = [s for s in (cfg.rollout.server, cfg.reward.server) if not s.api_token]
    if servers:
        token = secrets.token_urlsafe(24)
        for server in servers:
            server.api_token = token
        path = run_dir / API_TOKEN_FILE
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        generated.append("an API token")
    return generated


def _thread_env(threads: int) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        # One malloc arena: with one per thread, the freed activations of each step stay spread over the arenas
        # and the learner's resident memory climbed for three steps on the quick start (5.7 GiB peak against 4.2,
        # docs/LEARNER.md), with no speed lost. A value in the user's environment wins.
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1"),
    }


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
    plain, secret_env = split_secret_overrides(overrides)  # secrets travel in the environment, never in argv
    for item in plain:
        common += ["--set", item]
    env = {"PYTHONUNBUFFERED": "1", **secret_env, "DIPO_REDIS__URL": redis_url}
    known = {"redis.password": cfg.redis.password, "rollout.server.api_token": cfg.rollout.server.api_token,
             "reward.server.api_token": cfg.reward.server.api_token}  # fmt: skip
    for key, value in known.items():
        if value:
            env[env_name(key)] = value

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
        server = LocalRedis(RunFolder(run_dir).redis, appendfsync=cfg.redis.appendfsync, password=cfg.redis.password,
                            maxmemory_mb=cfg.redis.maxmemory_mb)  # fmt: skip
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
    console = console or Console()
    cfg = load_config(config_path, overrides)
    setup_logging(cfg.log_level, "launcher")
    run_dir = prepare_run_dir(cfg, resume=resume)
    _log_to_file(RunFolder(run_dir).logs / "launcher.log")
    gpus = _plan_gpus(cfg, visible_gpus)  # before Redis: a node without enough GPUs fails at once
    if gpus.learner or gpus.rollout:
        log.info("GPU layout: %s", gpus.describe())
    generated = fill_run_secrets(cfg, run_dir)
    if generated:
        log.info("generated for this run: %s (API token in %s)", ", ".join(generated), run_dir / API_TOKEN_FILE)
    redis_server = _start_redis(cfg, run_dir)
    try:
        redis_url = redis_server.url if redis_server is not None else str(cfg.redis.url)
        cfg.redis.url = redis_url
        write_resolved_config(cfg, run_dir)
        specs = build_child_specs(cfg, config_path, overrides, redis_url=redis_url, resume=resume, gpus=gpus)
        supervisor = Supervisor(specs, RunFolder(run_dir).logs, redis=redis_server)
        code = _supervise(supervisor, cfg, run_dir, console, live=panel and console.is_terminal)
    finally:
        if redis_server is not None and redis_server.is_running():
            redis_server.stop()  # only reached running when the supervisor never got to stop it
    report = _final_report(run_dir, console)
    if report is not None and cfg.learner.trackers:
        _track_report(config_path, overrides, report.parent)
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


def _final_report(run_dir: Path, console: Console) -> Path | None:
    try:
        path = build_report(run_dir)
    except Exception:  # a broken plot must not hide the run's outcome; the error is in the launcher log
        log.exception("could not build the report; rebuild it with `dipo report %s`", run_dir)
        return None
    console.print(f"report: {path}")
    return path


def _track_report(config_path: Path, overrides: Sequence[str], folder: Path) -> None:
    """Log the report's plots to the run's experiment trackers (a child process: the launcher imports no
    component)."""
    argv = [sys.executable, "-m", "learner.trackers", "--config", str(config_path), "--artifacts", str(folder)]
    plain, secret_env = split_secret_overrides(overrides)
    for item in plain:
        argv += ["--set", item]
    env = {**os.environ, **secret_env}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, env=env)
    if result.returncode != 0:
        log.warning("could not log the report to the trackers: %s", result.stderr[-2000:])


def _print_outcome(console: Console, code: int, statuses: list[ChildStatus]) -> None:
    words: dict[int, str] = {EXIT_DONE: "training finished", EXIT_INTERRUPTED: "interrupted", EXIT_FAILED: "failed"}
    restarts = ", ".join(f"{s.name} x{s.restarts}" for s in statuses if s.restarts) or "none"
    console.print(f"dipo run: {words.get(code, f'exit {code}')} (exit code {code}); restarts: {restarts}")
