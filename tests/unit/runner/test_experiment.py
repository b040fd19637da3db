"""``dipo experiment``: arm and seed parsing, the plan, resumability, and the comparison report built from
synthetic run folders (metrics.jsonl lines and evaluation results written here, no training)."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from runner.cli import app
from runner.experiment.plan import (
    DONE_FILE,
    EVAL_ARGS_FILE,
    EVAL_FILE,
    EXIT_INTERRUPTED,
    EvalSettings,
    ExperimentError,
    ExperimentPlan,
    PlannedRun,
    build_plan,
    check_run_record,
    parse_arm,
    parse_arms,
    parse_seeds,
    portable_args,
    read_eval,
    run_eval_args,
    run_experiment,
    run_state,
)
from runner.experiment.report import SECTIONS, build_experiment_report
from runner.experiment.stats import (
    METRICS,
    MIN_FIRINGS,
    Estimate,
    build_summary,
    estimate,
    load_runs,
    moving_average,
    t_quantile,
    verdict,
    window_bounds,
    window_mean,
)
from services.config import load_config

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- arms and seeds -------------------------------------------------------------------------------------------------


def test_each_arm_sets_loss_alpha_and_switches() -> None:
    def settings(name: str) -> dict[str, Any]:
        arm = parse_arm(name, 0.1)
        cfg = load_config(QUICKSTART, arm.overrides(), environ={})
        d = cfg.reward.dipo
        return {
            "loss": cfg.learner.loss,
            "alpha": cfg.learner.alpha,
            "dipo": d.enabled,
            "reward": d.enable_reward,
            "penalty": d.enable_penalty,
        }

    assert settings("dapo") == {"loss": "dapo", "alpha": 0.0, "dipo": False, "reward": True, "penalty": True}
    assert settings("dipo") == {"loss": "dapo", "alpha": 0.1, "dipo": True, "reward": True, "penalty": True}
    assert settings("grpo") == {"loss": "grpo", "alpha": 0.0, "dipo": False, "reward": True, "penalty": True}
    assert settings("reward-only") == {"loss": "dapo", "alpha": 0.1, "dipo": True, "reward": True, "penalty": False}
    assert settings("penalty-only") == {"loss": "dapo", "alpha": 0.1, "dipo": True, "reward": False, "penalty": True}
    assert settings("alpha=0.5") == {"loss": "dapo", "alpha": 0.5, "dipo": True, "reward": True, "penalty": True}


def test_alpha_arms_are_named_canonically_and_have_folder_safe_slugs() -> None:
    arm = parse_arm(" alpha=1.0 ", 0.1)
    assert arm.name == "alpha=1" and arm.slug == "alpha1" and arm.alpha == 1.0
    assert parse_arm("alpha=0.50", 0.1).slug == "alpha0.5"


@pytest.mark.parametrize(
    ("text", "alpha", "message"),
    [
        ("dapo,ppo", 0.1, "unknown arm 'ppo'"),
        ("alpha=0", 0.1, "the DAPO arm"),
        ("alpha=-1", 0.1, "alpha must be a number >= 0"),
        ("alpha=big", 0.1, "alpha must be a number >= 0"),
        ("dipo", 0.0, "set it > 0"),
        ("dapo,dapo", 0.1, "train the same thing"),
        ("dipo,alpha=0.1", 0.1, "train the same thing"),  # the config's alpha is 0.1: the same run twice
        (" , ", 0.1, "--arms is empty"),
    ],
)
def test_bad_arm_lists_are_refused(text: str, alpha: float, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        parse_arms(text, alpha)


def test_arms_keep_their_order() -> None:
    names = [a.name for a in parse_arms("dipo,dapo,grpo,reward-only,penalty-only,alpha=0.5,alpha=1", 0.1)]
    assert names == ["dipo", "dapo", "grpo", "reward-only", "penalty-only", "alpha=0.5", "alpha=1"]


@pytest.mark.parametrize(("text", "seeds"), [("3", [0, 1, 2]), ("1", [0]), ("0,7,9", [0, 7, 9]), ("7,", [7])])
def test_seeds_are_a_count_or_a_list(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0", "-2", "x", "1,1", ",", "1.5"])
def test_bad_seeds_are_refused(text: str) -> None:
    with pytest.raises(ExperimentError):
        parse_seeds(text)


# --- the plan -------------------------------------------------------------------------------------------------------


def test_plan_varies_only_arm_and_seed_and_keeps_the_data_order(tmp_path: Path) -> None:
    plan = build_plan(QUICKSTART, "dapo,dipo,grpo", "2", tmp_path / "exp", ["learner.steps=3", "learner.alpha=0.3"])
    assert [(r.arm.name, r.seed) for r in plan.runs] == [(a, s) for a in ("dapo", "dipo", "grpo") for s in (0, 1)]
    assert plan.steps == 3 and plan.out == (tmp_path / "exp").resolve()
    configs = [load_config(QUICKSTART, r.overrides, environ={}) for r in plan.runs]
    assert len({r.run_dir for r in plan.runs}) == len({c.name for c in configs}) == 6
    for run, cfg in zip(plan.runs, configs, strict=True):
        assert cfg.resolved_run_dir == run.run_dir and run.run_dir.parent == plan.out / "runs"
        assert cfg.learner.seed == cfg.sampling.seed == run.seed
        assert cfg.learner.steps == 3  # the user's overrides reach every run
        assert cfg.learner.alpha == (0.3 if run.arm.name == "dipo" else 0.0)  # the arm's settings win

    # everything else, the data section and its seed included, is the same in every run
    def rest(cfg: Any) -> dict[str, Any]:
        data = cfg.model_dump(mode="json")
        for section, key in (
            ("learner", "seed"),
            ("sampling", "seed"),
            ("learner", "loss"),
            ("learner", "alpha"),
            ("reward", "dipo"),
        ):
            data[section].pop(key)
        return {k: v for k, v in data.items() if k not in ("name", "run_dir")}

    assert all(rest(cfg) == rest(configs[0]) for cfg in configs)
    assert len({r.config_digest for r in plan.runs}) == 6


def test_plan_rejects_a_bad_override_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_plan(QUICKSTART, "dapo", "1", tmp_path, ["learner.steps=0"])
    with pytest.raises(ExperimentError, match="late fraction"):
        build_plan(QUICKSTART, "dapo", "1", tmp_path, late_fraction=0.0)


def test_run_state_follows_the_markers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_state(run_dir) == "fresh"
    (run_dir / "checkpoints" / "step-000002").mkdir(parents=True)
    assert run_state(run_dir) == "resume"
    (run_dir / DONE_FILE).write_text("{}")
    assert run_state(run_dir) == "done"


def test_a_run_folder_of_another_config_is_refused(tmp_path: Path) -> None:
    first = build_plan(QUICKSTART, "dapo", "1", tmp_path, ["learner.steps=3"]).runs[0]
    check_run_record(first)  # a new folder: the record is written
    check_run_record(first)  # the same run again: accepted
    changed = build_plan(QUICKSTART, "dapo", "1", tmp_path, ["learner.steps=3", "learner.lr=2e-6"]).runs[0]
    with pytest.raises(ExperimentError, match="another config"):
        check_run_record(changed)
    foreign = build_plan(QUICKSTART, "dipo", "1", tmp_path, ["learner.steps=3"]).runs[0]
    (foreign.run_dir / "checkpoints" / "step-000001").mkdir(parents=True)
    with pytest.raises(ExperimentError, match="did not start"):
        check_run_record(foreign)


# --- synthetic run folders ------------------------------------------------------------------------------------------


def write_metrics(run_dir: Path, lines: Sequence[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def line(step: int, **values: float | None) -> dict[str, Any]:
    base: dict[str, Any] = {
        "step": step,
        "accuracy": 0.3,
        "reward_mean": -0.4,
        "entropy": 0.8,
        "kind_easy": 0.1,
        "kind_normal": 0.6,
        "kind_hard": 0.3,
        "realloc_reward": 1,
        "realloc_penalty": 0,
        "tau": 1.5,
        "gate_open_ratio": 1.0,
        "ppl_correct": 1.4,
        "ppl_wrong": 1.6,
    }
    return base | values


def write_eval(run: PlannedRun, plan: ExperimentPlan, correct: Sequence[Sequence[bool]]) -> None:
    """An evaluation result of the run's final checkpoint: one entry per item, its samples' verdicts."""
    items = [
        {"item_id": f"chain_sum:10000:{i}", "samples": [{"correct": c} for c in samples]}
        for i, samples in enumerate(correct)
    ]
    flat = [c for samples in correct for c in samples]
    metrics = {
        "mean_at_k": sum(flat) / len(flat),
        "mean_at_k_ci95": [0.0, 1.0],
        "pass_at_k": 0.5,
        "maj_at_k": 0.4,
        "n_items": len(items),
        "n_samples": len(flat),
    }
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / EVAL_FILE).write_text(json.dumps({"metrics": metrics, "items": items}))
    (run.run_dir / EVAL_ARGS_FILE).write_text(json.dumps(run_eval_args(run, plan)))


def finish(run: PlannedRun, plan: ExperimentPlan) -> None:
    """What a finished training leaves behind: the final checkpoint, the resolved config, the done marker."""
    checkpoint = run.final_checkpoint(plan.steps)
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (run.run_dir / "config.yaml").write_text("{}")
    (run.run_dir / DONE_FILE).write_text("{}")


def runs_of(plan: ExperimentPlan) -> dict[tuple[str, int], PlannedRun]:
    return {(r.arm.name, r.seed): r for r in plan.runs}


# --- resumability ---------------------------------------------------------------------------------------------------


class FakeLaunch:
    """Stands in for `dipo run` (tested on its own): records each call and plays a scripted outcome per run."""

    def __init__(self, plan: ExperimentPlan, outcomes: dict[str, Callable[[PlannedRun, bool], int]]) -> None:
        self.plan, self.outcomes = plan, outcomes
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, config: Path, overrides: list[str], *, resume: bool, panel: bool, console: Console) -> int:
        assert config == self.plan.config and not panel
        run = next(r for r in self.plan.runs if list(r.overrides) == overrides)
        self.calls.append((run.arm.name, resume))
        return self.outcomes[run.arm.name](run, resume)

    def complete(self, run: PlannedRun, resume: bool) -> int:
        """Train to the end: metrics, final checkpoint, and a cached evaluation (so none is started)."""
        write_metrics(run.run_dir, [line(s) for s in range(1, self.plan.steps + 1)])
        run.final_checkpoint(self.plan.steps).mkdir(parents=True, exist_ok=True)
        (run.final_checkpoint(self.plan.steps) / "trainer_state.json").write_text("{}")
        write_eval(run, self.plan, [[True, False], [False, False]])
        return 0

    def interrupt(self, run: PlannedRun, resume: bool) -> int:
        write_metrics(run.run_dir, [line(1)])
        (run.run_dir / "checkpoints" / "step-000001").mkdir(parents=True)
        return EXIT_INTERRUPTED


def statuses(plan: ExperimentPlan) -> list[str]:
    return [r["status"] for r in build_summary(plan, load_runs(plan))["runs"]]


def test_an_interrupted_experiment_resumes_where_it_stopped(tmp_path: Path) -> None:
    plan = build_plan(QUICKSTART, "dapo,dipo", "1", tmp_path, ["learner.steps=2"], baseline=False)
    console = Console(file=io.StringIO(), width=120)
    fake, reports = FakeLaunch(plan, {}), Reports()
    fake.outcomes = {"dapo": fake.interrupt, "dipo": fake.complete}
    assert run_experiment(plan, console, launch_run=fake, report=reports) == EXIT_INTERRUPTED
    assert fake.calls == [("dapo", False)]  # it stopped at once: dipo did not start
    assert reports.states == [["incomplete", "not started"]]  # the report shows the partial state

    fake.outcomes["dapo"] = fake.complete
    assert run_experiment(plan, console, launch_run=fake, report=reports) == 0
    assert fake.calls[1:] == [("dapo", True), ("dipo", False)]  # dapo continued from its checkpoint
    assert reports.states[1:] == [["done", "not started"], ["done", "done"]]  # rebuilt after each run
    assert all(run_state(r.run_dir) == "done" for r in plan.runs)

    assert run_experiment(plan, console, launch_run=fake, report=reports) == 0
    assert len(fake.calls) == 3  # everything was done: nothing trained again
    assert "trained already, skipped" in console.file.getvalue()  # type: ignore[attr-defined]


def test_a_failed_run_does_not_stop_the_others_and_is_retried(tmp_path: Path) -> None:
    plan = build_plan(QUICKSTART, "dapo,dipo", "1", tmp_path, ["learner.steps=2"], baseline=False)
    console = Console(file=io.StringIO(), width=120)
    fake, reports = FakeLaunch(plan, {}), Reports()
    fake.outcomes = {"dapo": lambda run, resume: 1, "dipo": fake.complete}
    assert run_experiment(plan, console, launch_run=fake, report=reports) == 1
    assert fake.calls == [("dapo", False), ("dipo", False)]
    assert reports.states[-1] == ["failed (exit 1)", "done"]
    fake.outcomes["dapo"] = fake.complete
    assert run_experiment(plan, console, launch_run=fake, report=reports) == 0
    assert fake.calls[2:] == [("dapo", False)]
    assert statuses(plan) == ["done", "done"]


class Reports:
    """Stands in for the report builder (tested below): records the run statuses at each build."""

    def __init__(self) -> None:
        self.states: list[list[str]] = []

    def __call__(self, plan: ExperimentPlan) -> Path:
        self.states.append(statuses(plan))
        return plan.report_dir / "index.html"


# --- statistics -----------------------------------------------------------------------------------------------------


def test_t_quantiles() -> None:
    assert t_quantile(1) == 12.706 and t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert abs(t_quantile(40) - 2.021) < 0.001 and abs(t_quantile(120) - 1.980) < 0.001  # the tables' values
    assert abs(t_quantile(10_000) - 1.96) < 0.001


def test_estimate_over_seeds() -> None:
    e = estimate([0.4, 0.6])
    assert e.mean == pytest.approx(0.5) and e.sd == pytest.approx(math.sqrt(0.02)) and e.n == 2
    assert e.low == pytest.approx(0.5 - 12.706 * 0.1) and e.high == pytest.approx(0.5 + 12.706 * 0.1)
    single = estimate([0.3, None, math.nan])
    assert (single.mean, single.sd, single.low, single.n) == (0.3, None, None, 1)
    assert estimate([]).mean is None


@pytest.mark.parametrize(("steps", "early", "late"), [(2, (1, 1), (2, 2)), (6, (1, 2), (5, 6)), (10, (1, 4), (7, 10))])
def test_windows_are_a_third_of_the_steps_rounded_up(steps: int, early: tuple[int, int], late: tuple[int, int]) -> None:
    assert window_bounds(steps, 1 / 3) == (early, late)


def test_window_mean_and_moving_average_skip_missing_steps() -> None:
    values = np.array([1.0, np.nan, 3.0, 5.0])
    assert window_mean(values, (3, 4)) == 4.0
    assert window_mean(values, (2, 2)) is None
    assert moving_average(values, 2).tolist()[1:] == [1.0, 3.0, 4.0]


# --- the report -----------------------------------------------------------------------------------------------------


ARMS = "dapo,dipo,reward-only,penalty-only,alpha=0.5"


def synthetic_experiment(tmp_path: Path) -> ExperimentPlan:
    """Five arms x two seeds x six steps with known values (late window: steps 5 and 6)."""
    plan = build_plan(
        QUICKSTART,
        ARMS,
        "2",
        tmp_path / "exp",
        ["learner.steps=6"],
        baseline=False,
        eval_settings=EvalSettings(items=4, samples=2),
    )
    runs = runs_of(plan)
    for (arm, seed), run in runs.items():
        lines = []
        for step in range(1, 7):
            values: dict[str, Any] = {"accuracy": 0.1 * step + 0.01 * seed}
            if arm == "reward-only":
                values["entropy"] = 1.0 + 0.2 * seed  # late: 1.0 and 1.2
            if arm == "penalty-only":
                values["entropy"] = 0.6  # late: 0.6 -> differences 0.4 and 0.6
            if arm == "dipo":
                values |= {"ppl_correct": 2.0, "ppl_wrong": 3.0}  # gap 1.0 throughout
            if arm == "dapo":
                values |= {"ppl_correct": 2.0, "ppl_wrong": 3.0 if step <= 2 else 2.1}  # gap 1.0 early, 0.1 late
            lines.append(line(step, **values))
        write_metrics(run.run_dir, lines)
        (run.run_dir / DONE_FILE).write_text("{}")
    # held-out: 4 items x 2 samples; dapo 1/8 then 3/8 correct, dipo 4/8 then 6/8
    write_eval(runs["dapo", 0], plan, [[True, False], [False, False], [False, False], [False, False]])
    write_eval(runs["dapo", 1], plan, [[True, True], [True, False], [False, False], [False, False]])
    write_eval(runs["dipo", 0], plan, [[True, True], [True, False], [True, False], [False, False]])
    write_eval(runs["dipo", 1], plan, [[True, True], [True, True], [True, False], [True, False]])
    return plan


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentPlan, dict[str, Any]]:
    """The synthetic experiment with its report built once (drawing takes seconds); the plan and summary.json."""
    plan = synthetic_experiment(tmp_path_factory.mktemp("synthetic"))
    build_experiment_report(plan)
    return plan, json.loads((plan.report_dir / "summary.json").read_text(), parse_constant=pytest.fail)


def test_report_aggregates_curves_heldout_and_windows(synthetic: tuple[ExperimentPlan, dict[str, Any]]) -> None:
    summary = synthetic[1]
    assert summary["late_window"] == [5, 6] and summary["early_window"] == [1, 2]

    curve = summary["curves"]["dapo"]["accuracy"]
    assert curve["steps"] == [1, 2, 3, 4, 5, 6] and curve["n"] == [2] * 6
    assert curve["min"][0] == pytest.approx(0.1) and curve["max"][0] == pytest.approx(0.11)
    assert curve["mean"][5] == pytest.approx(0.605)
    assert set(summary["curves"]["dipo"]) == set(METRICS)

    late = summary["windows"]["dapo"]["accuracy"]["late"]
    assert late["mean"] == pytest.approx(0.555) and late["n"] == 2  # (0.5 + 0.6) / 2 + 0.01 / 2
    assert summary["windows"]["dapo"]["realloc_reward_total"]["mean"] == 6  # one per step

    dapo, dipo = summary["heldout"]["dapo"], summary["heldout"]["dipo"]
    assert dapo["mean_at_k"] == pytest.approx(0.25) and dipo["mean_at_k"] == pytest.approx(0.625)
    assert dapo["per_seed"] == {"0": 0.125, "1": 0.375}
    assert dapo["seeds"]["ci95"] == pytest.approx([0.25 - 12.706 * 0.125, 0.25 + 12.706 * 0.125], rel=1e-3)
    low, high = dipo["ci95_items"]
    assert 0 <= low < 0.625 < high <= 1  # a bootstrap over 4 items: wide, but around the mean
    assert dipo["vs_reference"]["diff"] == pytest.approx(0.375)
    assert dipo["vs_reference"]["seeds"]["mean"] == pytest.approx(0.375)
    assert summary["heldout"]["reward-only"]["n_runs"] == 0 and "mean_at_k" not in summary["heldout"]["reward-only"]


def test_report_mechanism_checks_and_alpha_table(synthetic: tuple[ExperimentPlan, dict[str, Any]]) -> None:
    summary = synthetic[1]
    checks = {c["id"]: c for c in summary["checks"]}
    fig5 = checks["figure5_entropy"]
    assert fig5["verdict"] == "inconclusive"  # the mean difference is the paper's, but its interval includes 0
    assert fig5["values"]["difference"]["mean"] == pytest.approx(0.5)
    assert "includes 0" in fig5["detail"]  # two seeds (0.4 and 0.6): a wide t interval
    fig7 = checks["figure7_perplexity_gap"]
    assert fig7["verdict"] == "inconclusive"
    assert "fired 12 times (fewer than 20)" in fig7["detail"]  # 6 reallocations per run, 2 seeds
    assert fig7["values"]["dipo"]["mean"] == pytest.approx(1.0) and fig7["values"]["dapo"]["mean"] == pytest.approx(0.1)
    assert fig7["values"]["dapo_gap_shrank"] is True
    assert [(r["arm"], r["alpha"]) for r in summary["alpha_sensitivity"]] == [
        ("dapo", 0),
        ("dipo", 0.1),
        ("alpha=0.5", 0.5),
    ]


def test_checks_say_when_the_paper_is_not_reproduced(tmp_path: Path) -> None:
    plan = build_plan(
        QUICKSTART, "dapo,dipo,reward-only,penalty-only", "1", tmp_path, ["learner.steps=3"], baseline=False
    )
    runs = runs_of(plan)
    for (arm, _), run in runs.items():
        values: dict[str, Any] = {
            "entropy": 0.5 if arm == "reward-only" else 0.9,
            "ppl_correct": 2.0,
            "ppl_wrong": 2.5 if arm == "dapo" else 1.5,
        }
        write_metrics(run.run_dir, [line(s, **values) for s in (1, 2, 3)])
    summary = build_summary(plan, load_runs(plan))
    assert [c["verdict"] for c in summary["checks"]] == ["inconclusive", "inconclusive"]  # one seed: no interval
    assert "one seed: no interval" in summary["checks"][0]["detail"]


@pytest.mark.parametrize(
    ("diff", "agrees", "fired", "expected"),
    [
        (Estimate(0.5, 0.1, 0.3, 0.7, 3), True, 100, "as in the paper"),
        (Estimate(-0.5, 0.1, -0.7, -0.3, 3), False, 100, "not as in the paper"),
        (Estimate(0.5, 0.4, -0.1, 1.1, 3), True, 100, "inconclusive"),  # the interval includes 0
        (Estimate(0.5, None, None, None, 1), True, 100, "inconclusive"),  # one seed
        (Estimate(0.5, 0.1, 0.3, 0.7, 3), True, MIN_FIRINGS - 1, "inconclusive"),  # the mechanism barely fired
        (Estimate(None, None, None, None, 0), True, 100, "no data"),
    ],
)
def test_a_verdict_needs_an_interval_that_excludes_0_and_enough_firings(
    diff: Estimate, agrees: bool, fired: float, expected: str
) -> None:
    assert verdict(diff, agrees, fired) == expected


def test_report_pages_hold_every_arm_table_and_plot(synthetic: tuple[ExperimentPlan, dict[str, Any]]) -> None:
    plan = synthetic[0]
    page, markdown = (plan.report_dir / "index.html").read_text(), (plan.report_dir / "summary.md").read_text()
    for text in (page, markdown):
        for heading in (
            "Held-out accuracy (mean@2)",
            "Late in training",
            "Mechanism checks",
            "Alpha sensitivity",
            "Runs",
            *[s.title for s in SECTIONS],
            "Figure 5",
            "Figure 7",
        ):
            assert heading in text, heading
        for arm in ARMS.split(","):
            assert f"arm {arm}:" in text
        for label in METRICS.values():
            assert label in text
    files = ["heldout.png", "figure5_entropy.png", "figure7_perplexity.png", *[s.file for s in SECTIONS]]
    for name in files:
        assert f"src='{name}'" in page and f"]({name})" in markdown
        assert (plan.report_dir / name).read_bytes().startswith(PNG_SIGNATURE)
    assert "../runs/dapo-s0/report/report.html" in page


def test_run_and_evaluation_records_survive_moving_the_experiment_folder(tmp_path: Path) -> None:
    plan = build_plan(QUICKSTART, "dapo", "1", tmp_path / "here", ["learner.steps=4"], baseline=False)
    run = plan.runs[0]
    write_eval(run, plan, [[True, False]])
    record = portable_args(run_eval_args(run, plan), run.run_dir)  # what evaluate_model writes
    assert not any(str(tmp_path) in arg for arg in record)
    assert "checkpoints/step-000004" in record and "config.yaml" in record
    (run.run_dir / EVAL_ARGS_FILE).write_text(json.dumps(record))
    check_run_record(run)  # writes run.json
    shutil.copytree(tmp_path / "here", tmp_path / "there")
    moved = build_plan(QUICKSTART, "dapo", "1", tmp_path / "there", ["learner.steps=4"], baseline=False)
    check_run_record(moved.runs[0])  # the moved run is the same run: not refused
    assert read_eval(moved.runs[0].run_dir, run_eval_args(moved.runs[0], moved)) is not None
    # an absolute record of an earlier version still counts where it was made, and a changed setting does not
    (run.run_dir / EVAL_ARGS_FILE).write_text(json.dumps(run_eval_args(run, plan)))
    assert read_eval(run.run_dir, run_eval_args(run, plan)) is not None
    assert read_eval(moved.runs[0].run_dir, [*run_eval_args(moved.runs[0], moved), "--threads", "9"]) is None


def test_an_exported_experiment_restores_its_runs_elsewhere(tmp_path: Path) -> None:
    here, export, there = tmp_path / "here", tmp_path / "export", tmp_path / "there"
    plan = build_plan(QUICKSTART, "dapo,dipo", "1", here, ["learner.steps=4"], baseline=False)
    here.mkdir()
    (here / "experiment.json").write_text(json.dumps(plan.to_dict()))
    (here / "config.yaml").write_text("{}")
    for run in plan.runs:
        check_run_record(run)
        finish(run, plan)
        write_metrics(run.run_dir, [line(step) for step in range(1, 5)])
        write_eval(run, plan, [[True, False], [True, True]])
        (run.run_dir / EVAL_ARGS_FILE).write_text(json.dumps(portable_args(run_eval_args(run, plan), run.run_dir)))
    build_experiment_report(plan)
    subprocess.run(["bash", str(REPO / "scripts" / "export_experiment.sh"), str(here), str(export)], check=True)
    assert not list(export.rglob("checkpoints")) and (export / "report" / "summary.md").is_file()
    shutil.copytree(export, there)
    moved = build_plan(QUICKSTART, "dapo,dipo", "1", there, ["learner.steps=4"], baseline=False)
    for run in moved.runs:
        check_run_record(run)
        assert run_state(run.run_dir) == "done"
    data = load_runs(moved)
    assert all(r.eval is not None and r.steps_logged == 4 for runs in data.values() for r in runs)


def test_report_tolerates_missing_runs_stale_evaluations_and_nulls(tmp_path: Path) -> None:
    plan = build_plan(QUICKSTART, "dapo,dipo", "2", tmp_path, ["learner.steps=4"], baseline=False)
    runs = runs_of(plan)
    write_metrics(runs["dapo", 0].run_dir, [line(1, entropy=None, tau=math.nan), line(2), {"step": 3}])
    write_eval(runs["dapo", 0], plan, [[True, False]])
    (runs["dapo", 0].run_dir / EVAL_ARGS_FILE).write_text(json.dumps(["--model", "another"]))  # made differently
    build_experiment_report(plan)
    summary = json.loads((plan.report_dir / "summary.json").read_text(), parse_constant=pytest.fail)
    statuses = {(r["arm"], r["seed"]): r["status"] for r in summary["runs"]}
    assert statuses == {
        ("dapo", 0): "incomplete",
        ("dapo", 1): "not started",
        ("dipo", 0): "not started",
        ("dipo", 1): "not started",
    }
    assert summary["heldout"]["dapo"]["n_runs"] == 0  # the stale evaluation is not used
    assert summary["curves"]["dapo"]["entropy"]["mean"] == [None, 0.8, None, None]
    assert summary["curves"]["dipo"]["entropy"]["n"] == [0, 0, 0, 0]
    assert summary["checks"][0]["verdict"] == "no data"
    data = load_runs(plan)
    assert data["dapo"][0].steps_logged == 3


def test_report_only_from_the_command_line(tmp_path: Path) -> None:
    plan = synthetic_experiment(tmp_path)
    argv = ["experiment", str(QUICKSTART), "--arms", ARMS, "--seeds", "2", "--out", str(plan.out), "--set"]
    argv += ["learner.steps=6", "--eval-items", "4", "--eval-samples", "2", "--no-baseline", "--report-only"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    summary = json.loads((plan.report_dir / "summary.json").read_text())
    assert summary["heldout"]["dipo"]["mean_at_k"] == pytest.approx(0.625)
    assert not (plan.out / "experiment.json").exists()  # nothing was run
    bad = CliRunner().invoke(app, ["experiment", str(QUICKSTART), "--arms", "ppo", "--report-only"])
    assert bad.exit_code == 2 and "unknown arm" in bad.output
