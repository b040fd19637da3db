"""``dipo chaos CONFIG --kills N --seed S``: train while SIGKILLing one process at a time, then audit the ledger.

The runner starts the whole pipeline the way ``dipo run`` does (its own Redis with an append-only file, the
learner, the reward services, the rollout servers, all supervised), waits for the first optimizer step, and then
repeats ``--kills`` times: wait a random gap, pick a target (a rollout server, a reward replica, the learner or
Redis itself; each kind once per round of kills, in a random order) and a moment (any time, inside a weight
broadcast, inside a checkpoint write: the learner publishes its phase in the policy hash), SIGKILL it, and wait
until the run has recovered: the process is back (the supervisor restarts children; the runner restarts Redis
after a random outage of up to a few seconds, on the same port, reloading its AOF) and the learner has finished a
new optimizer step. Only one failure is in the air at a time: the promise under test is that a run survives any
single failure.

After the last kill and a few more steps the runner stops the run the orderly way (the learner checkpoints), and
audits it with :mod:`services.ledger`: every prompt the feeder released was used by exactly one committed
optimizer update, or dropped with a reason (stale, no signal, dead-lettered), or is still waiting in a stream;
nothing else (lost) and nothing twice (doubled); versions only increase (in the committed history and in the
policy hash sampled during the run); and the final checkpoint loads (``python -m learner.verify``). The summary
goes to ``<run_dir>/chaos/summary.json``. With ``appendfsync always`` nothing may be lost; with ``everysec`` a
Redis crash may lose up to one second of writes, and prompts whose messages were lost are counted as ``lost``
(allowed, reported).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import redis

from runner.launcher import build_child_specs, prepare_run_dir
from runner.redis_server import LocalRedis
from runner.supervisor import RestartPolicy, Supervisor, _Child
from services.config import RunConfig, load_config, write_resolved_config
from services.contracts import DEADLETTER, POLICY, PROMPTS, ROLLOUTS, SCORED, PolicyField, RunFolder
from services.ledger import check_ledger, dead_letter_prompt_id, entry_prompt_id, read_ledger
from services.streams import run_key

log = logging.getLogger(__name__)

Target = Literal["rollout", "reward", "learner", "redis"]
Moment = Literal["any", "broadcast", "checkpoint"]
TARGETS: tuple[Target, ...] = ("rollout", "reward", "learner", "redis")
# Which moments make sense for which target: a broadcast involves the learner and the rollout servers; only the
# learner writes checkpoints.
MOMENTS: dict[Target, tuple[Moment, ...]] = {
    "rollout": ("any", "broadcast"),
    "reward": ("any",),
    "learner": ("any", "broadcast", "checkpoint"),
    "redis": ("any", "broadcast", "checkpoint"),
}


def parse_targets(text: str) -> tuple[Target, ...]:
    """``"rollout,learner"`` -> ("rollout", "learner"); ValueError on an unknown kind."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"targets must be a comma-separated subset of {','.join(TARGETS)}, got {text!r}")
    return tuple(cast(Target, t) for t in names)


def parse_appendfsync(text: str) -> Literal["always", "everysec"]:
    """The AOF policies a chaos run supports (``no`` has no loss bound to check)."""
    if text not in ("always", "everysec"):
        raise ValueError(f"appendfsync must be always or everysec, got {text!r}")
    return cast(Literal["always", "everysec"], text)


MOMENT_PHASES: dict[str, str] = {"broadcast": "sync", "checkpoint": "checkpoint"}
"""The learner phase (policy hash field ``phase``) in which each moment's kill lands."""

AIM_POLL_S = 0.3
CHAOS_RESTARTS = RestartPolicy(max_restarts=100_000, backoff_base_s=0.5, backoff_max_s=2.0)


@dataclass(frozen=True)
class ChaosPlan:
    """How many kills, of what, how far apart."""

    kills: int
    seed: int = 0
    targets: tuple[Target, ...] = TARGETS
    gap_s: tuple[float, float] = (1.0, 6.0)
    """Random wait after a recovery before the next kill."""
    redis_down_s: tuple[float, float] = (0.0, 3.0)
    """How long a killed Redis stays down before the runner restarts it."""
    moment_wait_s: float = 90.0
    """How long to wait for a chosen moment (a broadcast, a checkpoint) before killing anyway."""
    recover_timeout_s: float = 600.0
    """A kill the run has not recovered from within this long fails the chaos run."""
    settle_steps: int = 2
    """Optimizer steps to wait for after the last recovery before stopping."""
    appendfsync: Literal["always", "everysec"] = "always"

    def __post_init__(self) -> None:
        if self.kills < 0:
            raise ValueError("kills must be >= 0")
        unknown = set(self.targets) - set(TARGETS)
        if not self.targets or unknown:
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {self.targets}")


@dataclass
class Kill:
    """One SIGKILL and how the run came back from it."""

    index: int
    target: Target
    name: str
    pid: int
    moment: str
    at_s: float
    step: int
    phase: str
    recovered_after_s: float | None = None
    restarted_after_s: float | None = None


def chaos_overrides(run_dir: Path) -> list[str]:
    """Config overrides of a chaos run: its own folder, and training long enough to outlast the kills."""
    return [f"run_dir={run_dir}", "learner.steps=100000"]


class ChaosController:
    """The killer: called every tick of the supervisor's loop, it runs the kill/recover state machine."""

    def __init__(
        self, plan: ChaosPlan, supervisor: Supervisor, server: LocalRedis, cfg: RunConfig, run_dir: Path
    ) -> None:
        self.plan = plan
        self.supervisor = supervisor
        self.server = server
        self.cfg = cfg
        self.run_dir = run_dir
        self.rng = random.Random(plan.seed)
        self.client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.kills: list[Kill] = []
        self.versions_seen: list[int] = []
        self.version_regressions: list[tuple[int, int]] = []
        self.failure: str | None = None
        self.started = time.monotonic()
        self._metrics = RunFolder(run_dir).metrics
        self._metrics_offset = 0
        self._steps_done = 0  # metrics lines seen (one per optimizer step, redone steps included)
        self._last_step_at = 0.0
        self._state: Literal["warmup", "gap", "aim", "recovering", "settle", "done"] = "warmup"
        self._due = 0.0
        self._target: Target = "learner"
        self._bag: list[Target] = []
        self._moment: Moment = "any"
        self._aim_since = 0.0
        self._redis_back_at: float | None = None
        self._settle_from = 0
        self._next_version_poll = 0.0

    # ------------------------------------------------------------------ observation

    def now(self) -> float:
        return time.monotonic() - self.started

    def _read_metrics(self) -> None:
        if not self._metrics.exists():
            return
        with self._metrics.open("rb") as f:
            f.seek(self._metrics_offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._metrics_offset += len(complete)
        lines = [line for line in complete.splitlines() if line.strip()]
        if lines:
            self._steps_done += len(lines)
            self._last_step_at = self.now()

    def _policy(self) -> dict[str, str]:
        try:
            raw = self.client.hgetall(run_key(self.cfg.name, POLICY))
        except redis.RedisError:
            return {}
        return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]

    def _poll_version(self) -> None:
        if self.now() < self._next_version_poll:
            return
        self._next_version_poll = self.now() + 0.5
        version = self._policy().get("version")
        if version is None:
            return
        v = int(version)
        if self.versions_seen and v < self.versions_seen[-1]:
            self.version_regressions.append((self.versions_seen[-1], v))
        if not self.versions_seen or v != self.versions_seen[-1]:
            self.versions_seen.append(v)

    # ------------------------------------------------------------------ the state machine

    def tick(self) -> None:
        """One step of the state machine (the supervisor's on_tick)."""
        self._read_metrics()
        self._restart_redis_when_due()
        self._poll_version()
        state = self._state
        if state == "warmup":
            if self._steps_done >= 1:
                self._schedule_next()
        elif state == "gap":
            if self.now() >= self._due:
                if not self._bag:  # every kind once per round, in a random order: short runs still hit all
                    self._bag = list(self.plan.targets)
                    self.rng.shuffle(self._bag)
                self._target = self._bag.pop()
                self._moment = self.rng.choice(MOMENTS[self._target])
                self._aim_since = self.now()
                self._state = "aim"
        elif state == "aim":
            self._aim()
        elif state == "recovering":
            self._check_recovery()
        elif state == "settle":
            if self._steps_done >= self._settle_from + self.plan.settle_steps:
                log.info("chaos: %d kills done; stopping the run", len(self.kills))
                self._state = "done"
                self.supervisor.request_stop()

    def _aim(self) -> None:
        """Kill now if the chosen moment is here: poll the learner's phase tightly for a short while, since a
        broadcast of a small model lasts well under the supervisor's tick."""
        wanted = MOMENT_PHASES.get(self._moment)
        if wanted is None:
            self._kill(self._moment, self._policy().get(PolicyField.PHASE, ""))
            return
        key = run_key(self.cfg.name, POLICY)
        until = time.monotonic() + AIM_POLL_S
        phase = ""
        while time.monotonic() < until:
            try:
                raw = self.client.hget(key, PolicyField.PHASE)
            except redis.RedisError:
                return
            phase = raw.decode() if isinstance(raw, bytes) else ""
            if phase == wanted:
                self._kill(self._moment, phase)
                return
            time.sleep(0.003)
        if self.now() - self._aim_since > self.plan.moment_wait_s:
            self._kill(f"{self._moment} (missed: any)", phase)

    def _schedule_next(self) -> None:
        if len(self.kills) >= self.plan.kills:
            self._settle_from = self._steps_done
            self._state = "settle"
            return
        self._due = self.now() + self.rng.uniform(*self.plan.gap_s)
        self._state = "gap"

    def _victims(self, target: Target) -> list[_Child]:
        return [c for c in self.supervisor.children if c.spec.name.split("-")[0] == target and c.state == "running"]

    def _kill(self, moment: str, phase: str) -> None:
        target = self._target
        if target == "redis":
            if not self.server.is_running():
                return
            name, pid = "redis", self.server.pid
            down = self.rng.uniform(*self.plan.redis_down_s)
            self.server.kill()
            self._redis_back_at = self.now() + down
        else:
            victims = self._victims(target)
            if not victims:
                return  # all of that kind are restarting: try again next tick
            child = self.rng.choice(victims)
            assert child.proc is not None
            name, pid = child.spec.name, child.proc.pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        kill = Kill(len(self.kills) + 1, target, name, pid, moment, round(self.now(), 3), self._steps_done, phase)
        self.kills.append(kill)
        log.warning("chaos: kill %d/%d: SIGKILL %s (pid %d) at moment %s (learner phase %s)",
                    kill.index, self.plan.kills, name, pid, moment, phase or "?")  # fmt: skip
        self._state = "recovering"

    def _restart_redis_when_due(self) -> None:
        if self._redis_back_at is None or self.now() < self._redis_back_at:
            return
        self._redis_back_at = None
        self.server.start()  # same port and folder: it reloads the AOF
        log.info("chaos: redis-server restarted (pid %d)", self.server.pid)

    def _check_recovery(self) -> None:
        kill = self.kills[-1]
        elapsed = self.now() - kill.at_s
        if kill.restarted_after_s is None and self._is_back(kill):
            kill.restarted_after_s = round(elapsed, 3)
        if kill.restarted_after_s is not None and self._steps_done > kill.step and self._last_step_at > kill.at_s:
            kill.recovered_after_s = round(elapsed, 3)
            log.info("chaos: recovered from kill %d in %.1fs", kill.index, elapsed)
            self._schedule_next()
        elif elapsed > self.plan.recover_timeout_s:
            self.failure = f"no recovery from kill {kill.index} ({kill.name}) within {self.plan.recover_timeout_s}s"
            log.error("chaos: %s", self.failure)
            self._state = "done"
            self.supervisor.request_stop()

    def _is_back(self, kill: Kill) -> bool:
        if kill.target == "redis":
            return self.server.is_running()
        return any(c.spec.name == kill.name and c.state == "running" and c.proc and c.proc.pid != kill.pid
                   for c in self.supervisor.children)  # fmt: skip

    # ------------------------------------------------------------------ the audit

    def waiting_prompt_ids(self) -> set[str]:
        """Prompt ids of entries still waiting in prompts, rollouts or scored: undelivered to a group, or pending."""
        ids: set[str] = set()
        for name in (PROMPTS, ROLLOUTS, SCORED):
            key = run_key(self.cfg.name, name)
            if not self.client.exists(key):
                continue
            groups = cast(list[dict[str, Any]], self.client.xinfo_groups(key))
            starts = [g["last-delivered-id"] for g in groups] or [b"0-0"]
            pending: set[bytes] = set()
            for g in groups:
                rows = self.client.xpending_range(key, g["name"], min="-", max="+", count=100_000)
                for row in cast(list[dict[str, Any]], rows):
                    pending.add(row["message_id"])
            for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(key)):
                undelivered = any(_stream_id_key(entry_id) > _stream_id_key(start) for start in starts)
                if undelivered or entry_id in pending:
                    prompt_id = entry_prompt_id(key, fields)
                    if prompt_id is not None:
                        ids.add(prompt_id)
        return ids

    def dead_lettered_prompt_ids(self) -> set[str]:
        key = run_key(self.cfg.name, DEADLETTER)
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(key))
        return {p for _, raw in rows if (p := dead_letter_prompt_id(raw))}

    def summary(self, checkpoint: dict[str, Any], duration_s: float) -> dict[str, Any]:
        """Audit the run and describe it (kills, recoveries, the ledger accounting, problems)."""
        ledger = read_ledger(RunFolder(self.run_dir).ledger)
        check = check_ledger(
            ledger,
            dead_lettered=self.dead_lettered_prompt_ids(),
            in_streams=self.waiting_prompt_ids(),
            allow_lost=self.plan.appendfsync != "always",
        )
        problems = list(check.problems)
        if self.failure:
            problems.append(self.failure)
        if len(self.kills) < self.plan.kills:
            problems.append(f"only {len(self.kills)} of {self.plan.kills} kills happened")
        if self.version_regressions and self.plan.appendfsync == "always":
            problems.append(f"the published policy version went down: {self.version_regressions[:5]}")
        if "error" in checkpoint:
            problems.append(f"the final checkpoint does not load: {checkpoint['error']}")
        recoveries = [k.recovered_after_s for k in self.kills if k.recovered_after_s is not None]
        by_target: dict[str, list[float]] = {}
        for k in self.kills:
            if k.recovered_after_s is not None:
                by_target.setdefault(k.target, []).append(k.recovered_after_s)
        return {
            "ok": not problems,
            "problems": problems,
            "plan": dataclasses.asdict(self.plan),
            "duration_s": round(duration_s, 1),
            "kills": len(self.kills),
            "kills_by_target": dict(Counter(k.target for k in self.kills)),
            "kills_by_moment": dict(Counter(k.moment for k in self.kills)),
            "recoveries": len(recoveries),
            "time_to_recover_s": _spread(recoveries),
            "time_to_recover_by_target_s": {t: _spread(v) for t, v in sorted(by_target.items())},
            "lost": check.lost,
            "doubled": check.doubled,
            "ledger": check.to_dict(),
            "learner_starts": ledger.starts,
            "rollbacks": ledger.rollbacks,
            "steps_redone": ledger.discarded_steps,
            "versions_seen": len(self.versions_seen),
            "versions_only_increase": check.versions_increase and not self.version_regressions,
            "final_checkpoint": checkpoint,
            "kill_log": [dataclasses.asdict(k) for k in self.kills],
        }

    def close(self) -> None:
        self.client.close()


def _stream_id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 3),
        "median": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
    }


def verify_final_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Run ``python -m learner.verify`` on the newest checkpoint (in a child: it needs torch)."""
    root = RunFolder(run_dir).checkpoints
    latest = root / "latest"
    if not latest.is_file():
        return {"error": "no checkpoint was written"}
    folder = root / latest.read_text().strip()
    result = subprocess.run(
        [sys.executable, "-m", "learner.verify", str(folder)], capture_output=True, text=True, check=False
    )
    lines = result.stdout.strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        report = {"error": f"learner.verify exited {result.returncode}: {result.stderr[-2000:]}"}
    return report


@dataclass
class ChaosResult:
    summary: dict[str, Any]
    path: Path
    exit_code: int = field(default=0)


def run_chaos(config_path: Path | None, overrides: Sequence[str], plan: ChaosPlan, run_dir: Path) -> ChaosResult:
    """Run the pipeline under ``plan``'s kills in ``run_dir`` (a fresh folder), audit it, write the summary."""
    from services.log import setup_logging

    run_dir = Path(run_dir).resolve()
    all_overrides = [*overrides, *chaos_overrides(run_dir)]
    cfg = load_config(config_path, all_overrides)
    setup_logging(cfg.log_level, "chaos")
    prepare_run_dir(cfg, resume=False)
    out = run_dir / "chaos"
    out.mkdir(exist_ok=True)
    server = LocalRedis(RunFolder(run_dir).redis, appendfsync=plan.appendfsync, password=cfg.redis.password).start()
    started = time.monotonic()
    controller: ChaosController | None = None
    try:
        cfg.redis.url = server.url
        write_resolved_config(cfg, run_dir)
        specs = [
            dataclasses.replace(
                spec,
                restart_policy=dataclasses.replace(CHAOS_RESTARTS, restart_argv=spec.restart_policy.restart_argv),
            )
            for spec in build_child_specs(cfg, config_path, all_overrides, redis_url=server.url)
        ]
        # The runner, not the supervisor, owns Redis: it restarts it after a kill and audits it after the run.
        supervisor = Supervisor(specs, RunFolder(run_dir).logs, redis=None)
        controller = ChaosController(plan, supervisor, server, cfg, run_dir)
        restore = supervisor.install_signal_handlers()
        try:
            code = supervisor.run(on_tick=controller.tick, tick_s=0.05)
        finally:
            restore()
        if not server.is_running():
            server.start()
        checkpoint = verify_final_checkpoint(run_dir)
        summary = controller.summary(checkpoint, time.monotonic() - started)
        summary["run_exit_code"] = code
    finally:
        if controller is not None:
            controller.close()
        server.stop()
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return ChaosResult(summary, path, 0 if summary["ok"] else 1)
