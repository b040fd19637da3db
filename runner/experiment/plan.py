"""``dipo experiment``: train several arms (DAPO, DiPO, GRPO, ablations) under identical conditions, evaluate each
final policy on one fixed held-out set, and compare them in one report.

An experiment is a plan of runs, one per (arm, seed). Every run is an ordinary ``dipo run`` (``launch`` with the
panel off) of the same config file with the same ``--set`` overrides, plus the arm's overrides (loss, alpha, DiPO
switches), the seed's overrides (``learner.seed`` and ``sampling.seed``; ``data.seed`` is left alone, so every run
sees the prompts in the same order) and its own folder ``<out>/runs/<arm>-s<seed>``. Runs go one after the other.

Resuming is re-running the same command. A run whose folder holds a ``done`` marker is skipped; one with
checkpoints is continued with ``resume=True``; one without is started afresh (the launcher sets an earlier attempt's
leftovers aside). ``run.json`` in each folder records the resolved config the run was started with: a run folder
whose record differs from the plan is refused, so an edited config never silently mixes with an earlier one.

After training, the final checkpoint is evaluated by ``python -m evaluation`` (a subprocess: it loads torch, this
process does not) on the held-out set of the run's own config, which is the same for every run; the result is cached
as ``eval.json`` beside ``eval.args.json``, the arguments it was made with, and redone only when those change. The
base model is evaluated once the same way (``<out>/baseline``). The comparison report (runner/experiment/report.py)
is rebuilt after every run, so a long experiment can be read while it runs. docs/EXPERIMENTS.md is the user guide.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from runner.launcher import has_checkpoints, launch
from runner.supervisor import EXIT_INTERRUPTED
from services.config import RunConfig, dump_config, load_config, redact_overrides, write_resolved_config
from services.contracts import RunFolder

DONE_FILE = "done"
FAILED_FILE = "failed"
RUN_RECORD = "run.json"
EVAL_FILE = "eval.json"
EVAL_ARGS_FILE = "eval.args.json"
PLAN_FILE = "experiment.json"
LATE_FRACTION = 1 / 3
"""Default share of the planned steps, at the end of training, over which "late in training" figures are averaged."""

RunState = Literal["done", "resume", "fresh"]
_WORDS: dict[str, str] = {"done": "trained already, skipped", "resume": "resuming", "fresh": "starting"}
Launch = Callable[..., int]


class ExperimentError(ValueError):
    """The experiment cannot be planned or continued as asked (bad arms or seeds, a run folder of another run)."""


# --- arms -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One treatment: the policy loss, the advantage weight alpha of the reallocated reward, and the DiPO switches."""

    name: str
    loss: str
    alpha: float
    dipo: bool
    enable_reward: bool = True
    enable_penalty: bool = True
    description: str = ""

    @property
    def slug(self) -> str:
        """The arm's name as a folder and run-name part (``alpha=0.5`` -> ``alpha0.5``)."""
        return re.sub(r"[^A-Za-z0-9_.-]", "", self.name)

    @property
    def settings(self) -> tuple[str, float, bool, bool, bool]:
        """What the arm changes; two arms with equal settings would train the same thing twice."""
        return (self.loss, self.alpha, self.dipo, self.enable_reward, self.enable_penalty)

    def overrides(self) -> list[str]:
        """The ``--set`` overrides that make a run this arm."""
        return [
            f"learner.loss={self.loss}",
            f"learner.alpha={self.alpha!r}",
            f"reward.dipo.enabled={str(self.dipo).lower()}",
            f"reward.dipo.enable_reward={str(self.enable_reward).lower()}",
            f"reward.dipo.enable_penalty={str(self.enable_penalty).lower()}",
        ]


ARM_SYNTAX = "dapo, dipo, grpo, reward-only, penalty-only, alpha=X"


def parse_arm(token: str, config_alpha: float) -> Arm:
    """One arm from its name (see ARM_SYNTAX); ``config_alpha`` is the alpha of the DiPO arms without their own."""
    token = token.strip()
    needs_alpha = token in ("dipo", "reward-only", "penalty-only")
    if needs_alpha and config_alpha <= 0:
        raise ExperimentError(f"arm {token!r} uses the config's learner.alpha, which is {config_alpha}: set it > 0")
    if token == "dapo":
        return Arm(token, "dapo", 0.0, False, description="DAPO: alpha 0, no reallocation (plain dynamic sampling)")
    if token == "grpo":
        return Arm(token, "grpo", 0.0, False, description="GRPO sequence-mean loss, alpha 0, no reallocation")
    if token == "dipo":
        return Arm(token, "dapo", config_alpha, True, description=f"DiPO, alpha {config_alpha:g} (the config's)")
    if token == "reward-only":
        return Arm(
            token,
            "dapo",
            config_alpha,
            True,
            enable_penalty=False,
            description=f"DiPO, alpha {config_alpha:g}, max-PPL reward in hard groups only",
        )
    if token == "penalty-only":
        return Arm(
            token,
            "dapo",
            config_alpha,
            True,
            enable_reward=False,
            description=f"DiPO, alpha {config_alpha:g}, max-PPL penalty in easy groups only",
        )
    key, sep, value = token.partition("=")
    if sep and key.strip() == "alpha":
        try:
            alpha = float(value)
        except ValueError:
            alpha = math.nan
        if not math.isfinite(alpha) or alpha < 0:
            raise ExperimentError(f"arm {token!r}: alpha must be a number >= 0")
        if alpha == 0:
            raise ExperimentError("arm 'alpha=0' is the DAPO arm: write 'dapo'")
        return Arm(f"alpha={alpha:g}", "dapo", alpha, True, description=f"DiPO, alpha {alpha:g}")
    raise ExperimentError(f"unknown arm {token!r}: use {ARM_SYNTAX}")


def parse_arms(text: str, config_alpha: float) -> list[Arm]:
    """Comma-separated arms, in the order given; duplicates (by name or by settings) are an error."""
    arms = [parse_arm(token, config_alpha) for token in text.split(",") if token.strip()]
    if not arms:
        raise ExperimentError(f"--arms is empty: give a comma-separated list of {ARM_SYNTAX}")
    for i, arm in enumerate(arms):
        for other in arms[:i]:
            if arm.name == other.name or arm.settings == other.settings:
                raise ExperimentError(f"arms {other.name!r} and {arm.name!r} train the same thing: keep one")
    return arms


def parse_seeds(text: str) -> list[int]:
    """``3`` -> [0, 1, 2] (a count); ``0,7,9`` -> [0, 7, 9] (a list; ``7,`` is the single seed 7)."""
    text = text.strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ExperimentError(f"--seeds {text}: the number of seeds must be at least 1")
            return list(range(count))
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ExperimentError(f"--seeds {text!r}: give a count (3) or a comma-separated list of seeds (0,7,9)") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds {text!r}: the list must be non-empty and without repeats")
    return seeds


# --- the plan -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How every final policy (and the base model) is evaluated: the same items, samples and seed for all."""

    items: int = 100
    samples: int = 4
    seed: int = 0
    data: str | None = None  # a data spec (docs/EVALUATION.md); None: the held-out set of the config's data section
    threads: int | None = None
    batch_prompts: int | None = None

    def args(self, model: str, config: Path) -> list[str]:
        """Arguments of ``python -m evaluation`` for one model (without --out)."""
        args = [
            "--model",
            model,
            "--config",
            str(config),
            "--samples",
            str(self.samples),
            "--limit",
            str(self.items),
            "--seed",
            str(self.seed),
        ]
        if self.data is not None:
            args += ["--data", self.data]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.batch_prompts is not None:
            args += ["--batch-prompts", str(self.batch_prompts)]
        return args


@dataclass(frozen=True)
class PlannedRun:
    """One (arm, seed) run: its folder and the full list of overrides it is launched with."""

    arm: Arm
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    config_digest: str  # sha256 of the resolved config's non-default settings but Redis and run_dir: its identity

    @property
    def label(self) -> str:
        """``dipo seed 1``."""
        return f"{self.arm.name} seed {self.seed}"

    def final_checkpoint(self, steps: int) -> Path:
        """Folder of the checkpoint the learner writes after its last step."""
        return RunFolder(self.run_dir).checkpoints / f"step-{steps:06d}"


@dataclass(frozen=True)
class ExperimentPlan:
    """Everything one experiment runs and how its report reads it."""

    config: Path
    out: Path
    arms: list[Arm]
    seeds: list[int]
    overrides: list[str]
    steps: int
    eval: EvalSettings = field(default_factory=EvalSettings)
    baseline: bool = True
    late_fraction: float = LATE_FRACTION
    runs: list[PlannedRun] = field(default_factory=list)
    base_model: str = ""

    @property
    def report_dir(self) -> Path:
        """``<out>/report``."""
        return RunFolder(self.out).report

    @property
    def baseline_dir(self) -> Path:
        """``<out>/baseline``: the base model's evaluation."""
        return self.out / "baseline"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the plan (written to ``<out>/experiment.json`` and into the report's summary)."""
        return {
            "config": str(self.config),
            "out": str(self.out),
            "arms": [asdict(arm) for arm in self.arms],
            "seeds": self.seeds,
            "overrides": redact_overrides(self.overrides),  # secrets never recorded
            "steps": self.steps,
            "eval": asdict(self.eval),
            "baseline": self.baseline,
            "base_model": self.base_model,
            "late_fraction": self.late_fraction,
            "runs": [
                {
                    "arm": r.arm.name,
                    "seed": r.seed,
                    "run_dir": str(r.run_dir),
                    "overrides": redact_overrides(r.overrides),
                }
                for r in self.runs
            ],
        }


def config_digest(cfg: RunConfig) -> str:
    """sha256 of the settings of a resolved config that differ from their defaults, without its Redis section (a local
    Redis gets a new port on every start) and ``run_dir`` (a moved experiment folder holds the same runs).

    Only non-default settings count, so that a setting added in a later version (at its default) does not disown
    the runs already done; a run trained under a default that a later version changes is not told apart.
    """
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data.pop("redis", None)
    data.pop("run_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def build_plan(
    config: Path,
    arms: str,
    seeds: str,
    out: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    eval_settings: EvalSettings | None = None,
    baseline: bool = True,
    late_fraction: float = LATE_FRACTION,
) -> ExperimentPlan:
    """Resolve arms and seeds against the config, and check that every run's config is valid."""
    if not 0 < late_fraction <= 1:
        raise ExperimentError(f"late fraction {late_fraction} must be in (0, 1]")
    base = load_config(config, overrides)
    out = Path(out if out is not None else Path("runs") / "experiments" / base.name).resolve()
    arm_list = parse_arms(arms, base.learner.alpha)
    seed_list = parse_seeds(seeds)
    runs = []
    for arm in arm_list:
        for seed in seed_list:
            run_dir = out / "runs" / f"{arm.slug}-s{seed}"
            name = f"{base.name}-{arm.slug}-s{seed}"[-64:].lstrip("-.") or f"{arm.slug}-s{seed}"
            run_overrides = (
                *overrides,
                *arm.overrides(),
                f"learner.seed={seed}",
                f"sampling.seed={seed}",
                f"run_dir={run_dir}",
                f"name={name}",
            )
            cfg = load_config(config, run_overrides)
            runs.append(PlannedRun(arm, seed, run_dir, run_overrides, config_digest(cfg)))
    return ExperimentPlan(
        config=Path(config).resolve(),
        out=out,
        arms=arm_list,
        seeds=seed_list,
        overrides=list(overrides),
        steps=base.learner.steps,
        eval=eval_settings or EvalSettings(),
        baseline=baseline,
        late_fraction=late_fraction,
        runs=runs,
        base_model=base.model.name_or_path,
    )


# --- run folders ----------------------------------------------------------------------------------------------------


def run_state(run_dir: Path) -> RunState:
    """``done`` (trained: skip), ``resume`` (checkpoints of an interrupted attempt) or ``fresh``."""
    if (run_dir / DONE_FILE).is_file():
        return "done"
    return "resume" if has_checkpoints(run_dir) else "fresh"


def check_run_record(run: PlannedRun) -> None:
    """Refuse a run folder that was started with another resolved config; write the record for a new one."""
    record_path = run.run_dir / RUN_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("config_digest") != run.config_digest:
            raise ExperimentError(
                f"{run.run_dir} holds a run started with another config or other overrides "
                f"(see {record_path}); use another --out, or delete that folder to train it again"
            )
        return
    if run_state(run.run_dir) != "fresh":
        raise ExperimentError(f"{run.run_dir} holds a run that this experiment did not start: use another --out")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "arm": asdict(run.arm),
        "seed": run.seed,
        "overrides": redact_overrides(run.overrides),
        "config_digest": run.config_digest,
        "started_at": time.time(),
    }
    _write_json(record_path, record)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def mark_done(run_dir: Path, steps: int) -> None:
    """Record that the run finished training (the next attempt of the experiment skips it)."""
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    _write_json(run_dir / DONE_FILE, {"steps": steps, "finished_at": time.time()})


def mark_failed(run_dir: Path, code: int) -> None:
    """Record a failed attempt (the next attempt of the experiment tries the run again)."""
    _write_json(run_dir / FAILED_FILE, {"exit_code": code, "at": time.time()})


# --- evaluation -----------------------------------------------------------------------------------------------------


def portable_args(args: Sequence[str], folder: Path) -> list[str]:
    """``args`` with every path inside ``folder`` made relative to it: ``eval.args.json`` holds these, so that an
    experiment folder copied elsewhere (or committed, docs/RESULTS.md) still knows what its evaluations were made with.
    """
    root = folder.resolve()
    out = []
    for arg in args:
        path = Path(arg)
        if path.is_absolute() and path.resolve().is_relative_to(root):
            arg = path.resolve().relative_to(root).as_posix()
        out.append(arg)
    return out


def read_eval(folder: Path, args: Sequence[str]) -> dict[str, Any] | None:
    """The cached evaluation result in ``folder`` if it was made with exactly these arguments, else None.

    The record names paths inside ``folder`` relatively (:func:`portable_args`); one of an earlier version, with
    absolute paths, counts too.
    """
    result, record = folder / EVAL_FILE, folder / EVAL_ARGS_FILE
    try:
        if json.loads(record.read_text()) not in (portable_args(args, folder), list(args)):
            return None
        data = json.loads(result.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and "metrics" in data else None


def run_eval_args(run: PlannedRun, plan: ExperimentPlan) -> list[str]:
    """The evaluation arguments of a run's final checkpoint."""
    return plan.eval.args(str(run.final_checkpoint(plan.steps)), RunFolder(run.run_dir).config)


def baseline_eval_args(plan: ExperimentPlan) -> list[str]:
    """The evaluation arguments of the base model."""
    return plan.eval.args(plan.base_model, RunFolder(plan.baseline_dir).config)


def evaluate_model(args: list[str], folder: Path, settings: EvalSettings, console: Console) -> Path:
    """Run ``python -m evaluation ARGS`` into ``folder/eval.json`` unless a result made with the same ARGS is there."""
    model = args[args.index("--model") + 1]
    result, record = folder / EVAL_FILE, folder / EVAL_ARGS_FILE
    if read_eval(folder, args) is not None:
        console.print(f"evaluation of {model}: cached in {result}")
        return result
    tmp = folder / (EVAL_FILE + ".tmp")
    log_path = RunFolder(folder).logs / "eval.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"evaluating {model}: {settings.items} items x {settings.samples} samples")
    argv = [sys.executable, "-m", "evaluation", *args, "--out", str(tmp), "--no-progress"]
    with log_path.open("a") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {argv}\n")
        out.flush()
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise ExperimentError(f"the evaluation of {model} failed (exit {code}); see {log_path}")
    tmp.replace(result)
    _write_json(record, portable_args(args, folder))
    metrics = json.loads(result.read_text())["metrics"]
    low, high = metrics["mean_at_k_ci95"]
    console.print(f"  mean@{settings.samples} {metrics['mean_at_k']:.3f} [{low:.3f}, {high:.3f}] -> {result}")
    return result


def evaluate_run(run: PlannedRun, plan: ExperimentPlan, console: Console) -> Path:
    """Evaluate a trained run's final checkpoint on the held-out set of its own config."""
    checkpoint = run.final_checkpoint(plan.steps)
    if not (checkpoint / "trainer_state.json").is_file():
        raise ExperimentError(f"{run.label}: no complete final checkpoint {checkpoint}")
    return evaluate_model(run_eval_args(run, plan), run.run_dir, plan.eval, console)


def evaluate_baseline(plan: ExperimentPlan, console: Console) -> Path:
    """Evaluate the base model with the experiment's config (the same held-out set as every run)."""
    write_resolved_config(load_config(plan.config, plan.overrides), plan.baseline_dir)
    return evaluate_model(baseline_eval_args(plan), plan.baseline_dir, plan.eval, console)


# --- execution ------------------------------------------------------------------------------------------------------


def run_experiment(
    plan: ExperimentPlan,
    console: Console,
    *,
    launch_run: Launch = launch,
    report: Callable[[ExperimentPlan], Path] | None = None,
) -> int:
    """Train and evaluate every planned run that is not done yet, rebuilding the report after each; an exit code.

    0: every run trained and evaluated; 1: some failed (the others went on; re-running retries them);
    130: interrupted (re-running continues). ``launch_run`` (``runner.launcher.launch``) and ``report``
    (``build_experiment_report``) are parameters so that tests of the bookkeeping can stand in for them.
    """
    if report is None:
        from runner.experiment.report import build_experiment_report

        report = build_experiment_report
    plan.out.mkdir(parents=True, exist_ok=True)
    _write_json(plan.out / PLAN_FILE, plan.to_dict())
    RunFolder(plan.out).config.write_text(dump_config(load_config(plan.config, plan.overrides)))
    failures: list[str] = []
    if plan.baseline:
        try:
            evaluate_baseline(plan, console)
        except ExperimentError as exc:
            failures.append(f"baseline: {exc}")
            console.print(f"[red]{exc}[/red]")
    for index, run in enumerate(plan.runs, 1):
        check_run_record(run)
        state = run_state(run.run_dir)
        console.rule(f"[{index}/{len(plan.runs)}] {run.label}: {_WORDS[state]}")
        if state != "done":
            with _own_logging():
                code = launch_run(
                    plan.config, list(run.overrides), resume=state == "resume", panel=False, console=console
                )
            if code == EXIT_INTERRUPTED:
                report(plan)
                console.print(f"interrupted during {run.label}: run the same command again to continue")
                return EXIT_INTERRUPTED
            if code != 0:
                mark_failed(run.run_dir, code)
                failures.append(f"{run.label}: training exited with code {code}")
                console.print(f"[red]{run.label} failed (exit {code}); see {run.run_dir / 'logs'}[/red]")
                continue
            mark_done(run.run_dir, plan.steps)
        try:
            evaluate_run(run, plan, console)
        except ExperimentError as exc:
            failures.append(f"{run.label}: {exc}")
            console.print(f"[red]{exc}[/red]")
        if state != "done" and index < len(plan.runs):
            report(plan)  # readable while the next run trains
    console.print(f"experiment report: {report(plan)}")
    for failure in failures:
        console.print(f"[red]failed:[/red] {failure}")
    return 1 if failures else 0


@contextlib.contextmanager
def _own_logging() -> Iterator[None]:
    """Give the root logger back its handlers after a launch: the launcher sets up logging into the run's folder."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
