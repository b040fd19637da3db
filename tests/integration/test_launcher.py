"""The `dipo run` launcher: supervision of real child processes (tiny Python programs, never the real pipeline),
the child specs built from a shipped config, the run folder rules, and the panel's readers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from rich.console import Console
from typer.testing import CliRunner

from runner.cli import app
from runner.launcher import LaunchError, build_child_specs, prepare_run_dir
from runner.panel import MetricsTail, PlainDisplay, RunMonitor, Snapshot, plain_line, render
from runner.redis_server import LocalRedis
from runner.supervisor import (
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    STOP_RANK_LEARNER,
    STOP_RANK_REWARD,
    STOP_RANK_ROLLOUT,
    ChildSpec,
    RestartPolicy,
    Supervisor,
)
from services.config import RunConfig, load_config
from services.contracts import PROMPTS
from services.streams import connect_sync, run_key

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
HANG_GUARD_S = 60.0  # children and waits give up after this, so a broken test fails instead of hanging

# One program for every child role; its behaviour comes from argv[1] and the environment. Every child appends
# its pid to <name>.pids and stamps <name>.<tag> files with time.time_ns() (ready, term, done); once ready (its
# SIGTERM handler installed) it appends its name to all.ready. WAIT_BEFORE holds it back until a file exists.
CHILD = r"""
import os, signal, subprocess, sys, time
from pathlib import Path

out, name, mode = Path(os.environ["OUT_DIR"]), os.environ["NAME"], sys.argv[1]
deadline = time.monotonic() + 60
while os.environ.get("WAIT_BEFORE") and not (out / os.environ["WAIT_BEFORE"]).exists() and time.monotonic() < deadline:
    time.sleep(0.02)

def stamp(tag):
    (out / f"{name}.{tag}").write_text(str(time.time_ns()))

def on_term(signum, frame):
    stamp("term")
    time.sleep(float(os.environ.get("TERM_DELAY_S", "0")))
    stamp("done")
    sys.exit(0)

with (out / f"{name}.pids").open("a") as f:
    f.write(f"{os.getpid()}\n")
starts = len((out / f"{name}.pids").read_text().split())
if mode == "crash_first" and starts <= int(os.environ.get("CRASHES", "1")):
    sys.exit(1)
if mode == "crash":
    sys.exit(int(os.environ.get("CODE", "1")))
if mode == "learner":  # crashes on a fresh start, finishes when restarted with --resume
    (out / f"{name}.argv").open("a").write(" ".join(sys.argv[2:]) + "\n")
    sys.exit(0 if "--resume" in sys.argv else 1)
if mode == "grandchild":
    kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (out / f"{name}.grandchild").write_text(str(kid.pid))
if mode == "kill_redis":
    import redis
    os.kill(int(os.environ["REDIS_PID"]), signal.SIGKILL)
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            pid = client.info("server")["process_id"]
            if pid != int(os.environ["REDIS_PID"]):
                (out / f"{name}.new_redis_pid").write_text(str(pid))
                sys.exit(0)
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        time.sleep(0.05)
    sys.exit(4)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE_TERM") else on_term)
stamp("ready")
with (out / "all.ready").open("a") as f:
    f.write(f"{name}\n")
wait_for, wait_lines = os.environ.get("WAIT_FOR"), int(os.environ.get("WAIT_LINES", "1"))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if wait_for and (out / wait_for).exists() and len((out / wait_for).read_text().split()) >= wait_lines:
        sys.exit(0)
    time.sleep(0.02)
sys.exit(3)
"""

DRIVER = r"""
import json, sys
from pathlib import Path
from runner.supervisor import ChildSpec, RestartPolicy, Supervisor

data = json.loads(Path(sys.argv[1]).read_text())
specs = [ChildSpec(d["name"], d["argv"], d["env"], RestartPolicy(max_restarts=0), primary=d["primary"],
                   stop_rank=d["stop_rank"], stop_grace_s=20) for d in data["specs"]]
supervisor = Supervisor(specs, Path(data["log_dir"]), poll_interval_s=0.05)
supervisor.install_signal_handlers()
sys.exit(supervisor.run())
"""

FAST = RestartPolicy(max_restarts=3, backoff_base_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    (tmp_path / "child.py").write_text(CHILD)
    return folder


def child(out: Path, name: str, mode: str = "sleep", policy: RestartPolicy = FAST, **kw: object) -> ChildSpec:
    """A ChildSpec running CHILD; keyword arguments in upper case become its environment."""
    env = {"OUT_DIR": str(out), "NAME": name} | {k: str(v) for k, v in kw.items() if k.isupper()}
    options = {k: v for k, v in kw.items() if not k.isupper()}
    argv = [sys.executable, str(out.parent / "child.py"), mode]
    return ChildSpec(name, argv, env, policy, **options)  # type: ignore[arg-type]


def pids(out: Path, name: str) -> list[int]:
    return [int(p) for p in (out / f"{name}.pids").read_text().split()]


def stamp(out: Path, name: str, tag: str) -> int:
    return int((out / f"{name}.{tag}").read_text())


def gone(pid: int) -> bool:
    """The process does not exist (or is a zombie that only an uninterested parent could reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def run_supervisor(supervisor: Supervisor) -> int:
    """Run with a hang guard: a supervisor that never ends is stopped (and the test fails on its exit code)."""
    start = time.monotonic()

    def guard() -> None:
        if time.monotonic() - start > HANG_GUARD_S:
            supervisor.request_stop()

    return supervisor.run(on_tick=guard, tick_s=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# supervision


def test_crashed_worker_is_restarted_with_a_new_pid(out: Path) -> None:
    specs = [
        child(out, "learner", WAIT_FOR="worker.ready", primary=True, stop_rank=STOP_RANK_LEARNER),
        child(out, "worker", "crash_first", CRASHES=2),
    ]
    supervisor = Supervisor(specs, out / "logs", poll_interval_s=0.02)
    assert run_supervisor(supervisor) == EXIT_DONE
    worker_pids = pids(out, "worker")
    assert len(worker_pids) == 3 and len(set(worker_pids)) == 3
    status = {s.name: s for s in supervisor.statuses()}
    assert status["worker"].restarts == 2
    assert status["learner"].state == "exited" and status["learner"].exit_code == 0
    assert status["worker"].state == "stopped"
    for pid in worker_pids + pids(out, "learner"):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    log_text = (out / "logs" / "worker.log").read_text()
    assert log_text.count("launcher: start worker") == 3


def test_learner_exit_0_stops_every_child_and_its_processes(out: Path) -> None:
    specs = [
        child(out, "learner", WAIT_FOR="all.ready", WAIT_LINES=3, primary=True, stop_rank=STOP_RANK_LEARNER),
        child(out, "parent", "grandchild", stop_rank=STOP_RANK_ROLLOUT),
        child(out, "stubborn", IGNORE_TERM=1, stop_rank=STOP_RANK_REWARD, stop_grace_s=0.3),
    ]
    supervisor = Supervisor(specs, out / "logs", poll_interval_s=0.02)
    assert run_supervisor(supervisor) == EXIT_DONE
    assert (out / "parent.term").exists()  # a polite SIGTERM first
    assert not (out / "stubborn.term").exists()  # ignored it, was killed after the grace period
    children = [pid for name in ("learner", "parent", "stubborn") for pid in pids(out, name)]
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert gone(int((out / "parent.grandchild").read_text()))  # killed with its parent's process group


def test_crashed_learner_is_restarted_with_resume(out: Path) -> None:
    learner = ChildSpec(
        "learner",
        [sys.executable, str(out.parent / "child.py"), "learner", "--config", "x.yaml"],
        {"OUT_DIR": str(out), "NAME": "learner"},
        RestartPolicy(
            backoff_base_s=0.01,
            restart_argv=(sys.executable, str(out.parent / "child.py"), "learner", "--config", "x.yaml", "--resume"),
        ),  # fmt: skip
        primary=True,
    )
    supervisor = Supervisor([learner, child(out, "worker")], out / "logs", poll_interval_s=0.02)
    assert run_supervisor(supervisor) == EXIT_DONE
    assert (out / "learner.argv").read_text().splitlines() == ["--config x.yaml", "--config x.yaml --resume"]
    assert supervisor.statuses()[0].restarts == 1


def test_restart_cap_fails_the_run_and_stops_the_rest(out: Path) -> None:
    policy = RestartPolicy(max_restarts=2, backoff_base_s=0.01)
    specs = [
        child(out, "learner", primary=True, stop_rank=STOP_RANK_LEARNER),
        child(out, "worker", "crash", policy, WAIT_BEFORE="learner.ready"),
    ]
    supervisor = Supervisor(specs, out / "logs", poll_interval_s=0.02)
    assert run_supervisor(supervisor) == EXIT_FAILED
    status = {s.name: s for s in supervisor.statuses()}
    assert status["worker"].state == "failed" and status["worker"].restarts == 2
    assert len(pids(out, "worker")) == 3
    assert (out / "learner.term").exists()
    for pid in pids(out, "learner") + pids(out, "worker"):
        assert gone(pid)


def test_the_restart_cap_counts_a_rolling_window_not_the_whole_run(out: Path) -> None:
    # Crashes spaced further apart than the window never reach the cap; the same number inside it would.
    # A crash comes well within 1 s of its restart (the window holds that restart); the restart before it is 1.5 s
    # further back (out of the window). Counted over the whole run, the 3rd crash would exceed the cap of 2.
    policy = RestartPolicy(max_restarts=2, window_s=1.0, backoff_base_s=1.5, backoff_max_s=1.5, stable_after_s=0.0)
    specs = [
        child(out, "learner", primary=True, stop_rank=STOP_RANK_LEARNER, WAIT_FOR="worker.pids", WAIT_LINES=4),
        child(out, "worker", "crash", policy),
    ]
    supervisor = Supervisor(specs, out / "logs", poll_interval_s=0.02)
    assert run_supervisor(supervisor) == EXIT_DONE  # the learner saw the worker's 4th start, then finished
    assert len(pids(out, "worker")) >= 4  # 3 restarts and more: past the cap of 2, never 2 within the window


def test_usage_error_is_not_restarted(out: Path) -> None:
    specs = [child(out, "learner", primary=True), child(out, "worker", "crash", CODE=2)]
    supervisor = Supervisor(specs, out / "logs", poll_interval_s=0.02)
    assert run_supervisor(supervisor) == EXIT_FAILED
    assert len(pids(out, "worker")) == 1


def test_sigterm_to_the_supervisor_stops_learner_first_then_rollout_then_reward(out: Path) -> None:
    specs = [
        child(out, "learner", TERM_DELAY_S=0.3, primary=True, stop_rank=STOP_RANK_LEARNER),
        child(out, "rollout-0", TERM_DELAY_S=0.2, stop_rank=STOP_RANK_ROLLOUT),
        child(out, "reward-0", stop_rank=STOP_RANK_REWARD),
    ]
    plan = {
        "log_dir": str(out / "logs"),
        "specs": [
            {"name": s.name, "argv": s.argv, "env": s.env, "primary": s.primary, "stop_rank": s.stop_rank}
            for s in specs
        ],  # fmt: skip
    }
    (out / "plan.json").write_text(json.dumps(plan))
    (out.parent / "driver.py").write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(out.parent / "driver.py"), str(out / "plan.json")])
    try:
        wait_until(lambda: all((out / f"{s.name}.ready").exists() for s in specs), "children to start")
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(HANG_GUARD_S)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert code == EXIT_INTERRUPTED
    assert stamp(out, "learner", "done") <= stamp(out, "rollout-0", "term")
    assert stamp(out, "rollout-0", "done") <= stamp(out, "reward-0", "term")
    for name in ("learner", "rollout-0", "reward-0"):
        assert all(gone(pid) for pid in pids(out, name))


def test_second_stop_request_kills_without_waiting_for_the_grace_period(out: Path) -> None:
    specs = [child(out, "learner", IGNORE_TERM=1, primary=True, stop_grace_s=HANG_GUARD_S * 10)]
    supervisor = Supervisor(specs, out / "logs", poll_interval_s=0.02)
    supervisor.start()
    wait_until(lambda: (out / "learner.ready").exists(), "the child to start")
    supervisor.request_stop()
    supervisor.request_stop()
    assert supervisor.run() == EXIT_INTERRUPTED
    assert gone(pids(out, "learner")[0])


def test_launcher_owned_redis_is_restarted_after_a_crash_and_stopped_at_the_end(out: Path, tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "redis").start()
    try:
        old_pid = server.pid
        specs = [child(out, "learner", "kill_redis", primary=True, REDIS_PID=old_pid, REDIS_URL=server.url)]
        supervisor = Supervisor(specs, out / "logs", redis=server, poll_interval_s=0.02)
        assert run_supervisor(supervisor) == EXIT_DONE
        assert supervisor.redis_restarts == 1
        new_pid = int((out / "learner.new_redis_pid").read_text())
        assert not server.is_running()
        for pid in (old_pid, new_pid):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        server.close()


def test_duplicate_names_are_refused(out: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([child(out, "a"), child(out, "a")], out)


# ---------------------------------------------------------------------------------------------------------------------
# the run: specs, folder, command line


def test_child_specs_of_the_quickstart_config(tmp_path: Path) -> None:
    overrides = ["reward.replicas=2", "rollout.workers=3", "rollout.torch_threads=2", f"run_dir={tmp_path}/run"]
    cfg = load_config(QUICKSTART, overrides, environ={})
    specs = build_child_specs(cfg, QUICKSTART, overrides, redis_url="redis://127.0.0.1:7777/0", resume=False)

    roles = [s.argv[2] for s in specs]
    assert roles == ["learner"] + ["reward_service"] * 2 + ["rollout_server"] * 3
    assert [s.name for s in specs] == ["learner", "reward-0", "reward-1", "rollout-0", "rollout-1", "rollout-2"]
    ports = [int(a.split("=")[1]) for s in specs for a in s.argv if ".server.port=" in a]
    assert len(ports) == 6 and len(set(ports)) == 6 and 6379 not in ports
    for spec in specs:
        assert spec.argv[0] == sys.executable
        assert f"--config={QUICKSTART.resolve()}" in spec.argv
        assert all(item in spec.argv for item in overrides)
        assert spec.env["DIPO_REDIS__URL"] == "redis://127.0.0.1:7777/0"
        assert spec.env["PYTHONUNBUFFERED"] == "1"
        assert spec.env["MALLOC_ARENA_MAX"] == os.environ.get("MALLOC_ARENA_MAX", "1")
    learner, rewards, rollouts = specs[0], specs[1:3], specs[3:]
    assert learner.primary and learner.stop_rank == STOP_RANK_LEARNER
    assert "--resume" not in learner.argv
    assert learner.restart_policy.restart_argv is not None and learner.restart_policy.restart_argv[-1] == "--resume"
    assert learner.env["OMP_NUM_THREADS"] == str(cfg.learner.torch_threads)
    assert all(s.env["OMP_NUM_THREADS"] == "2" and s.stop_rank == STOP_RANK_ROLLOUT for s in rollouts)
    assert all(s.env["OMP_NUM_THREADS"] == "1" and s.stop_rank == STOP_RANK_REWARD for s in rewards)
    assert f"--port-file={tmp_path}/run/ports/rollout-2.port" in rollouts[2].argv


def test_child_specs_resume_and_fixed_ports() -> None:
    overrides = ["reward.replicas=2", "reward.server.port=9100", "redis.password=s3cret"]
    cfg = load_config(QUICKSTART, overrides, environ={})
    specs = build_child_specs(cfg, QUICKSTART, overrides, redis_url="redis://h:1/0", resume=True)
    assert specs[0].argv[-1] == "--resume"
    assert "--set" in specs[1].argv and "reward.server.port=9100" in specs[1].argv[-2]
    assert "reward.server.port=9101" in specs[2].argv[-2]
    assert specs[1].env["DIPO_REDIS__PASSWORD"] == "s3cret"


def test_specs_run_under_the_supervisor_without_importing_torch() -> None:
    # the launcher starts components as processes: importing it must not pull torch or vLLM into `services`
    code = "import sys, runner.cli, runner.launcher, runner.panel, runner.report; " \
           "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _cfg(tmp_path: Path, **extra: object) -> RunConfig:
    return RunConfig.model_validate({"name": "r1", "run_dir": str(tmp_path / "run"), **extra})


def test_run_folder_with_checkpoints_needs_resume(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    (cfg.resolved_run_dir / "checkpoints" / "step-000006").mkdir(parents=True)
    with pytest.raises(LaunchError, match="--resume"):
        prepare_run_dir(cfg, resume=False)
    assert prepare_run_dir(cfg, resume=True) == cfg.resolved_run_dir
    assert (cfg.resolved_run_dir / "logs").is_dir()


def test_fresh_run_sets_aside_leftovers_of_an_attempt_without_checkpoints(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run_dir = cfg.resolved_run_dir
    (run_dir / "redis").mkdir(parents=True)
    (run_dir / "redis" / "appendonly.aof").write_text("old")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    prepare_run_dir(cfg, resume=False)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "redis").exists()
    (aside,) = run_dir.glob("previous-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (aside / "redis" / "appendonly.aof").is_file()


def test_dipo_run_help_and_refusal_of_a_used_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "--resume" in result.output and "--no-panel" in result.output
    run_dir = tmp_path / "used"
    (run_dir / "checkpoints" / "step-000001").mkdir(parents=True)
    result = runner.invoke(app, ["run", str(QUICKSTART), "--set", f"run_dir={run_dir}", "--no-panel"])
    assert result.exit_code == 2
    assert "--resume" in result.output
    assert not (run_dir / "logs").exists()  # refused before anything started


def test_dipo_report_command(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.5}\n')
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "report.html").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# the panel's readers


def test_metrics_tail_reads_only_complete_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "acc')
    assert [r["step"] for r in tail.read_new()] == [1, 2]
    with path.open("a") as f:
        f.write('uracy": 0.5}\nnot json\n')
    assert tail.read_new() == [{"step": 3, "accuracy": 0.5}]
    assert tail.bad_lines == 1
    assert tail.read_new() == []
    path.write_text('{"step": 9}\n')  # replaced: read from the start again
    assert tail.read_new() == [{"step": 9}]


def test_monitor_reads_metrics_policy_and_streams(tmp_path: Path, redis_url: str, run_name: str) -> None:
    cfg = RunConfig.model_validate({"name": run_name, "learner": {"steps": 10}})
    client = connect_sync(redis_url)
    client.hset(run_key(run_name, "policy"), mapping={"version": "2", "status": "running"})
    client.xadd(run_key(run_name, PROMPTS), {"d": b"x"})
    lines = [{"step": s, "time": 1000.0 + 5 * s, "realloc_reward": 1, "realloc_penalty": None} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    monitor = RunMonitor(tmp_path, cfg, redis_url)
    try:
        snap = monitor.snapshot()
    finally:
        monitor.close()
        client.close()
    assert snap.step == 2 and len(snap.new_rows) == 2
    assert snap.policy == {"version": "2", "status": "running"}
    assert snap.streams == {"prompts": 1, "rollouts": 0, "scored": 0, "deadletter": 0}
    assert snap.realloc_reward_total == 2 and snap.realloc_penalty_total == 0
    assert snap.eta_s == pytest.approx(8 * 5.0)  # one step per 5 s, 8 steps left


def test_monitor_survives_an_unreachable_redis(tmp_path: Path) -> None:
    monitor = RunMonitor(tmp_path, RunConfig(), "redis://127.0.0.1:1/0")
    try:
        snap = monitor.snapshot()
    finally:
        monitor.close()
    assert snap.redis_error is not None and snap.last is None


def test_render_and_plain_lines_tolerate_missing_values() -> None:
    console = Console(file=io.StringIO(), width=140, force_terminal=False)
    console.print(render(Snapshot(total_steps=5)))
    row = {"step": 3, "accuracy": 0.25, "tau": None}
    snap = Snapshot(total_steps=5, last=row, steps_per_s=0.5)
    console.print(render(snap))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "0 / 5" in text and "3 / 5" in text and "0.250" in text
    line = plain_line(row, snap)
    assert line.startswith("step 3/5") and "acc 0.250" in line and "tau* -" in line and "ETA 4s" in line


def test_plain_display_prints_one_line_per_new_step(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({"learner": {"steps": 4}})
    monitor = RunMonitor(tmp_path, cfg, None)
    console = Console(file=io.StringIO(), width=200)
    display = PlainDisplay(monitor, console)
    display.tick()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    display.tick()
    display.tick()
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [line.split()[1:3] for line in lines] == [["step", "1/4"], ["step", "2/4"]]


# ---------------------------------------------------------------------------------------------------------------------
# launch() end to end with stand-in components (the real pipeline is the lead's end-to-end test)

FAKE_LEARNER = r"""
import json, os, sys, time
from pathlib import Path
import redis

run_dir, run = Path(os.environ["RUN_DIR"]), os.environ["RUN_NAME"]
client = redis.Redis.from_url(os.environ["DIPO_REDIS__URL"], socket_timeout=5)
client.hset(f"dipo:{run}:policy", mapping={"version": "0", "status": "running"})
with (run_dir / "metrics.jsonl").open("a") as f:
    for step in (1, 2, 3):
        line = {"step": step, "version": step, "time": time.time(), "accuracy": 0.1 * step, "reward_mean": 0.0}
        f.write(json.dumps(line) + "\n")
        f.flush()
        time.sleep(0.2)
client.hset(f"dipo:{run}:policy", mapping={"version": "3", "status": "done"})
"""


@pytest.fixture
def restore_logging() -> object:
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def test_launch_runs_stand_ins_with_a_local_redis_and_writes_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: object
) -> None:
    import runner.launcher as launcher

    (tmp_path / "learner.py").write_text(FAKE_LEARNER)
    seen: dict[str, str] = {}

    argvs: list[str] = []

    def fake_specs(cfg: RunConfig, config_path: Path | None, overrides: list[str], **kw: object) -> list[ChildSpec]:
        real = build_child_specs(cfg, config_path, overrides, **kw)  # type: ignore[arg-type]
        seen.update(real[0].env)
        argvs.extend(arg for spec in real for arg in spec.argv)
        env = real[0].env | {"RUN_DIR": str(cfg.resolved_run_dir), "RUN_NAME": cfg.name}
        return [
            ChildSpec("learner", [sys.executable, str(tmp_path / "learner.py")], env, primary=True, stop_rank=0),
            ChildSpec("reward-0", [sys.executable, "-c", "import time; time.sleep(60)"], env, stop_rank=2),
        ]

    monkeypatch.setattr(launcher, "build_child_specs", fake_specs)
    run_dir = tmp_path / "run"
    console = Console(file=io.StringIO(), width=200)
    overrides = [f"run_dir={run_dir}", "name=standin", "learner.steps=3", "redis.password=pw1"]
    code = launcher.launch(QUICKSTART, overrides, panel=True, console=console)  # not a terminal: plain lines

    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert code == EXIT_DONE, output
    assert seen["DIPO_REDIS__URL"].startswith("redis://:pw1@127.0.0.1:")
    assert "step 3/3" in output and "training finished" in output
    assert (run_dir / "report" / "report.html").is_file()
    assert (run_dir / "redis" / "appendonlydir").is_dir() or list((run_dir / "redis").glob("appendonly*"))
    written = (run_dir / "config.yaml").read_text()
    assert "url: redis://***@127.0.0.1:" in written and "pw1" not in written  # children get it from the env
    assert seen["DIPO_REDIS__PASSWORD"] == "pw1"
    assert not any("pw1" in arg for arg in argvs)  # a --set secret reaches the children through the environment
    token = (run_dir / "api_token").read_text().strip()  # generated: none was configured
    assert (
        len(token) >= 32 and seen["DIPO_ROLLOUT__SERVER__API_TOKEN"] == seen["DIPO_REWARD__SERVER__API_TOKEN"] == token
    )
    assert (run_dir / "api_token").stat().st_mode & 0o777 == 0o600 and run_dir.stat().st_mode & 0o777 == 0o700
    assert token not in written and not any(token in arg for arg in argvs)
    assert "launcher: start learner" in (run_dir / "logs" / "learner.log").read_text()
    port = int(seen["DIPO_REDIS__URL"].rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.ConnectionError):  # the launcher's redis-server is gone
        client = connect_sync(f"redis://:pw1@127.0.0.1:{port}/0", timeout_s=0.5, retries=0)
        try:
            client.ping()
        finally:
            client.close()
