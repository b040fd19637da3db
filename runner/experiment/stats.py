"""What an experiment's report states, computed from its run folders: curves, windows, intervals, checks.

The inputs are each planned run's ``metrics.jsonl`` (read with runner/report.py's reader: the last line written
for a step wins) and its ``eval.json``. A run that has not started, failed, or has no evaluation yet contributes
what it has. ``build_summary`` returns one JSON-able mapping, written as ``summary.json`` and rendered by
runner/experiment/report.py. The definitions (docs/EXPERIMENTS.md explains them at more length):

- Steps are the planned ``learner.steps`` S. The *late window* is the last ``ceil(S * late_fraction)`` steps (the
  last third by default), the *early window* the first as many. A run's value over a window is the mean of its
  per-step values there, steps without a value skipped.
- Curves: per step, the mean over the arm's seeds, and the lowest and highest seed (the band).
- Held-out accuracy, mean@K on one fixed evaluation set (the same items and sampling seed for every run):
  * over problems x samples: percentile bootstrap over items (2,000 resamples, RNG seed 0) of the per-item accuracy
    pooled over the arm's seeds. Items, not samples, are resampled, as in evaluation/core.py: the K samples of one
    item are correlated;
  * over seeds: Student-t 95 % interval of the per-seed mean@K (two seeds or more);
  * against the reference arm (the first one): paired bootstrap over items of the per-item accuracy difference, and
    a paired Student-t interval over the seeds both arms have.
- Window figures: mean over seeds with a Student-t 95 % interval over seeds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner.experiment.plan import (
    DONE_FILE,
    FAILED_FILE,
    ExperimentPlan,
    PlannedRun,
    baseline_eval_args,
    read_eval,
    run_eval_args,
)
from runner.report import read_metrics, series
from services.contracts import MetricKey as K
from services.contracts import RunFolder
from services.stats import bootstrap_ci

SCHEMA_VERSION = 1
METRICS: dict[str, str] = {
    K.ACCURACY: "training accuracy (used groups)",
    K.REWARD_MEAN: "reward (mean R, used groups)",
    K.ENTROPY: "policy entropy (nats/token)",
    K.KIND_EASY: "share of easy groups",
    K.KIND_NORMAL: "share of normal groups",
    K.KIND_HARD: "share of hard groups",
    K.REALLOC_REWARD: "reallocations: reward (hard groups) per step",
    K.REALLOC_PENALTY: "reallocations: penalty (easy groups) per step",
    K.TAU: "tau* (perplexity threshold)",
    K.GATE_OPEN_RATIO: "gate open ratio",
    K.PPL_CORRECT: "perplexity of correct responses",
    K.PPL_WRONG: "perplexity of wrong responses",
    "ppl_gap": "perplexity gap (wrong - correct)",
}
"""Every per-step metric of the report: metrics.jsonl keys (docs/METRICS.md), plus ppl_gap = ppl_wrong - ppl_correct."""
REALLOCATIONS = ("realloc_reward", "realloc_penalty")

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# --- statistics -----------------------------------------------------------------------------------------------------


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (a Cornish-Fisher expansion past 30)."""
    if df < 1:
        raise ValueError("a t interval needs at least 1 degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds, its standard deviation and 95 % t interval (sd and interval None below two values)."""

    mean: float | None
    sd: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        ci = None if self.low is None else [self.low, self.high]
        return {"mean": self.mean, "sd": self.sd, "ci95": ci, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        """Inverse of to_dict."""
        low, high = data.get("ci95") or (None, None)
        return cls(data["mean"], data["sd"], low, high, data["n"])


def estimate(values: Iterable[float | None]) -> Estimate:
    """Mean, sd and Student-t 95 % interval of the finite values."""
    data = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not data:
        return Estimate(None, None, None, None, 0)
    mean = sum(data) / len(data)
    if len(data) < 2:
        return Estimate(mean, None, None, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in data) / (len(data) - 1))
    half = t_quantile(len(data) - 1) * sd / math.sqrt(len(data))
    return Estimate(mean, sd, mean - half, mean + half, len(data))


def window_bounds(steps: int, fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """((first, last) step of the early window, (first, last) of the late window), steps counted from 1."""
    width = max(1, math.ceil(steps * fraction))
    return (1, width), (steps - width + 1, steps)


def window_mean(values: np.ndarray, bounds: tuple[int, int]) -> float | None:
    """Mean of the finite values of steps first..last (the value of step s at index s - 1); None if there are none."""
    part = values[bounds[0] - 1 : bounds[1]]
    part = part[np.isfinite(part)]
    return float(part.mean()) if part.size else None


def moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Trailing mean over ``width`` steps of the finite values (NaN where the window holds none)."""
    out = np.full(values.shape, np.nan)
    for i in range(values.size):
        part = values[max(0, i - width + 1) : i + 1]
        part = part[np.isfinite(part)]
        if part.size:
            out[i] = part.mean()
    return out


def aggregate(arrays: Sequence[np.ndarray], length: int) -> dict[str, list[Any]]:
    """Per step: mean, lowest and highest of the finite values across the arrays, and how many there were."""
    stack = np.vstack(arrays) if arrays else np.full((0, length), np.nan)
    out: dict[str, list[Any]] = {"mean": [], "min": [], "max": [], "n": []}
    for column in stack.T:
        finite = column[np.isfinite(column)]
        out["n"].append(int(finite.size))
        for name, reduce in (("mean", np.mean), ("min", np.min), ("max", np.max)):
            out[name].append(float(reduce(finite)) if finite.size else None)
    return out


# --- runs -----------------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """What one planned run has produced so far."""

    run: PlannedRun
    status: str
    curves: dict[str, np.ndarray]  # metric -> values of steps 1..S (NaN where missing)
    steps_logged: int
    eval: dict[str, Any] | None

    @property
    def heldout(self) -> float | None:
        """mean@K of the evaluation, if there is one."""
        return None if self.eval is None else float(self.eval["metrics"]["mean_at_k"])

    def per_item(self) -> dict[str, tuple[int, int]]:
        """item id -> (correct samples, samples) of the evaluation."""
        items = self.eval.get("items", []) if self.eval is not None else []
        return {
            item["item_id"]: (sum(bool(s["correct"]) for s in item["samples"]), len(item["samples"])) for item in items
        }


def run_status(run: PlannedRun, steps_logged: int) -> str:
    """``done``, ``failed (exit N)``, ``incomplete`` (interrupted or training now) or ``not started``."""
    if (run.run_dir / DONE_FILE).is_file():
        return "done"
    failed = run.run_dir / FAILED_FILE
    if failed.is_file():
        return f"failed (exit {json.loads(failed.read_text()).get('exit_code')})"
    return "incomplete" if steps_logged else "not started"


def load_run(run: PlannedRun, plan: ExperimentPlan) -> RunData:
    """Read one run's metrics of steps 1..S and its evaluation, if it matches the plan's evaluation settings."""
    rows, _ = read_metrics(RunFolder(run.run_dir).metrics)
    rows = [row for row in rows if 1 <= int(row[K.STEP]) <= plan.steps]
    index = [int(row[K.STEP]) - 1 for row in rows]
    columns = {key: np.array(series(rows, key), dtype=np.float64) for key in METRICS if key != "ppl_gap"}
    columns["ppl_gap"] = columns["ppl_wrong"] - columns["ppl_correct"]
    curves = {}
    for key, column in columns.items():
        curves[key] = np.full(plan.steps, np.nan)
        curves[key][index] = column
    evaluation = read_eval(run.run_dir, run_eval_args(run, plan))
    return RunData(run, run_status(run, len(rows)), curves, len(rows), evaluation)


def load_runs(plan: ExperimentPlan) -> dict[str, list[RunData]]:
    """arm name -> the data of its runs, in seed order."""
    return {arm.name: [load_run(r, plan) for r in plan.runs if r.arm.name == arm.name] for arm in plan.arms}


def pooled_items(runs: Sequence[RunData]) -> dict[str, float]:
    """item id -> accuracy pooled over the evaluated runs' samples, for the items all of them have."""
    tables = [r.per_item() for r in runs if r.eval is not None]
    if not tables:
        return {}
    shared = set(tables[0]).intersection(*tables[1:])
    return {i: sum(t[i][0] for t in tables) / sum(t[i][1] for t in tables) for i in sorted(shared)}


# --- summary --------------------------------------------------------------------------------------------------------


def heldout_summary(plan: ExperimentPlan, data: dict[str, list[RunData]]) -> dict[str, Any]:
    """Per arm: mean@K, its intervals over items x samples and over seeds, and the difference to the first arm."""
    reference = plan.arms[0].name
    ref_items = pooled_items(data[reference])
    ref_seeds = {r.run.seed: r.heldout for r in data[reference] if r.heldout is not None}
    out: dict[str, Any] = {}
    for arm in plan.arms:
        runs = [r for r in data[arm.name] if r.eval is not None]
        by_seed = {r.run.seed: r.heldout for r in runs}
        entry: dict[str, Any] = {
            "n_runs": len(runs),
            "per_seed": by_seed,
            "seeds": estimate(by_seed.values()).to_dict(),
        }
        items = pooled_items(runs)
        if items:
            values = np.array(list(items.values()))
            entry["mean_at_k"] = float(values.mean())
            entry["ci95_items"] = list(bootstrap_ci(values))
            entry["n_items"] = len(items)
            for key in ("pass_at_k", "maj_at_k"):
                entry[key] = estimate(r.eval["metrics"][key] for r in runs if r.eval is not None).mean
        shared = sorted(set(items) & set(ref_items))
        if arm.name != reference and shared:
            diffs = np.array([items[i] - ref_items[i] for i in shared])
            paired = estimate(v - ref_seeds[s] for s, v in by_seed.items() if s in ref_seeds and v is not None)
            entry["vs_reference"] = {
                "reference": reference,
                "diff": float(diffs.mean()),
                "ci95_items": list(bootstrap_ci(diffs)),
                "seeds": paired.to_dict(),
            }
        out[arm.name] = entry
    return out


def window_summary(plan: ExperimentPlan, data: dict[str, list[RunData]]) -> dict[str, Any]:
    """Per arm and metric: each seed's early- and late-window value, and their estimates over seeds; plus the
    total reallocations per run."""
    early, late = window_bounds(plan.steps, plan.late_fraction)
    out: dict[str, Any] = {}
    for arm in plan.arms:
        runs = data[arm.name]
        entry: dict[str, Any] = {}
        for key in METRICS:
            late_values = {r.run.seed: window_mean(r.curves[key], late) for r in runs}
            early_values = {r.run.seed: window_mean(r.curves[key], early) for r in runs}
            entry[key] = {
                "late": estimate(late_values.values()).to_dict(),
                "late_per_seed": late_values,
                "early": estimate(early_values.values()).to_dict(),
                "early_per_seed": early_values,
            }
        for key in REALLOCATIONS:
            entry[f"{key}_total"] = estimate(float(np.nansum(r.curves[key])) for r in runs if r.steps_logged).to_dict()
        out[arm.name] = entry
    return out


def _paired_late(windows: dict[str, Any], a: str, b: str, key: str) -> Estimate:
    """Estimate over the seeds both arms have of (a's late-window value - b's)."""
    va, vb = windows[a][key]["late_per_seed"], windows[b][key]["late_per_seed"]
    return estimate(va[s] - vb[s] for s in va if va[s] is not None and vb.get(s) is not None)


def describe(value: Estimate, digits: int = 3) -> str:
    """``0.412 [0.380, 0.444] (n=3)``, ``0.412 (n=1)`` or ``-``: how every estimate is written."""
    if value.mean is None:
        return "-"
    if value.low is None or value.high is None:
        return f"{value.mean:.{digits}f} (n={value.n})"
    return f"{value.mean:.{digits}f} [{value.low:.{digits}f}, {value.high:.{digits}f}] (n={value.n})"


def _significance(diff: Estimate) -> str:
    if diff.low is None or diff.high is None:
        return "one seed: no interval"
    excludes = diff.low > 0 or diff.high < 0
    return f"the 95 % interval over seeds {'excludes' if excludes else 'includes'} 0"


MIN_FIRINGS = 20
"""A mechanism check needs its mechanism to have fired at least this often (reallocations summed over the seeds of
the arm(s) it is about) before it may say "as in the paper" or "not": fewer, and the arms barely differ."""


def verdict(diff: Estimate, agrees: bool, fired: float | None = None) -> str:
    """``as in the paper`` / ``not as in the paper`` only when the interval over seeds of ``diff`` excludes 0 and
    the mechanism fired at least MIN_FIRINGS times; ``inconclusive`` otherwise (one seed gives no interval), and
    ``no data`` without a difference at all. ``agrees``: the paper's direction, judged on the means."""
    if diff.mean is None:
        return "no data"
    if fired is not None and fired < MIN_FIRINGS:
        return "inconclusive"
    if diff.low is None or diff.high is None or diff.low <= 0 <= diff.high:
        return "inconclusive"
    return "as in the paper" if agrees else "not as in the paper"


def _fired(windows: dict[str, Any], arm: str) -> float:
    """Reallocations of ``arm`` (reward and penalty), summed over its seeds."""
    total = 0.0
    for key in REALLOCATIONS:
        value = Estimate.from_dict(windows[arm][f"{key}_total"])
        if value.mean is not None:
            total += value.mean * value.n
    return total


def _why(verdict_text: str, diff: Estimate, fired: float | None) -> str:
    if verdict_text != "inconclusive":
        return ""
    if fired is not None and fired < MIN_FIRINGS:
        return f"; inconclusive: the mechanism fired {fired:.0f} times (fewer than {MIN_FIRINGS})"
    return "; inconclusive: the interval over seeds includes 0 (or there is one seed)"


def figure5_check(windows: dict[str, Any]) -> dict[str, Any]:
    """Figure 5: with only the max-PPL reward, entropy stays above the run with only the max-PPL penalty."""
    ro = Estimate.from_dict(windows["reward-only"]["entropy"]["late"])
    po = Estimate.from_dict(windows["penalty-only"]["entropy"]["late"])
    diff = _paired_late(windows, "reward-only", "penalty-only", "entropy")
    fired = _fired(windows, "reward-only") + _fired(windows, "penalty-only")
    outcome = verdict(diff, diff.mean is not None and diff.mean > 0, fired)
    detail = f"late entropy: reward-only {describe(ro)}, penalty-only {describe(po)}; difference {describe(diff)}"
    return {
        "id": "figure5_entropy",
        "title": "Figure 5: entropy, max-PPL reward only vs max-PPL penalty only",
        "expected": "late-window entropy of reward-only above penalty-only",
        "values": {"reward-only": ro.to_dict(), "penalty-only": po.to_dict(), "difference": diff.to_dict(),
                   "reallocations": fired},
        "verdict": outcome,
        "detail": detail + ("" if diff.mean is None else f"; {_significance(diff)}") + _why(outcome, diff, fired),
    }  # fmt: skip


def figure7_check(windows: dict[str, Any]) -> dict[str, Any]:
    """Figure 7: late in training, wrong responses keep a higher perplexity than correct ones under DiPO, while
    under DAPO the two converge."""
    dipo = Estimate.from_dict(windows["dipo"]["ppl_gap"]["late"])
    dapo = Estimate.from_dict(windows["dapo"]["ppl_gap"]["late"])
    dapo_early = Estimate.from_dict(windows["dapo"]["ppl_gap"]["early"])
    diff = _paired_late(windows, "dipo", "dapo", "ppl_gap")
    fired = _fired(windows, "dipo")
    if dipo.mean is None or dapo.mean is None:
        outcome = "no data"
    else:
        outcome = verdict(diff, dipo.mean > 0 and dipo.mean > dapo.mean, fired)
    shrank = None if dapo.mean is None or dapo_early.mean is None else abs(dapo.mean) < abs(dapo_early.mean)
    trend = "" if shrank is None else ", shrinking" if shrank else ", not shrinking"
    detail = (
        f"late gap: DiPO {describe(dipo)}, DAPO {describe(dapo)} (DAPO early {describe(dapo_early)}{trend}); "
        f"DiPO - DAPO {describe(diff)}"
    )
    return {
        "id": "figure7_perplexity_gap",
        "title": "Figure 7: perplexity of wrong minus correct responses, DiPO vs DAPO",
        "expected": "late-window gap above 0 under DiPO and above DAPO's (under DAPO the two converge)",
        "values": {
            "dipo": dipo.to_dict(),
            "dapo": dapo.to_dict(),
            "dapo_early": dapo_early.to_dict(),
            "difference": diff.to_dict(),
            "dapo_gap_shrank": shrank,
            "reallocations": fired,
        },
        "verdict": outcome,
        "detail": detail + ("" if diff.mean is None else f"; {_significance(diff)}") + _why(outcome, diff, fired),
    }


def mechanism_checks(plan: ExperimentPlan, windows: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's checks whose arms the plan has: Figure 5 (reward-only, penalty-only), Figure 7 (dipo, dapo)."""
    names = {arm.name for arm in plan.arms}
    checks = []
    if {"reward-only", "penalty-only"} <= names:
        checks.append(figure5_check(windows))
    if {"dipo", "dapo"} <= names:
        checks.append(figure7_check(windows))
    return checks


def alpha_rows(plan: ExperimentPlan, heldout: dict[str, Any], windows: dict[str, Any]) -> list[dict[str, Any]]:
    """The alpha-sensitivity table when an ``alpha=X`` arm is planned: DAPO as alpha 0 and every full-DiPO arm,
    by alpha."""
    if not any(arm.name.startswith("alpha=") for arm in plan.arms):
        return []
    chosen = [a for a in plan.arms if a.name == "dapo" or (a.dipo and a.enable_reward and a.enable_penalty)]
    rows = []
    for arm in sorted(chosen, key=lambda a: a.alpha):
        h, w = heldout[arm.name], windows[arm.name]
        row = {
            "arm": arm.name,
            "alpha": arm.alpha,
            "mean_at_k": h.get("mean_at_k"),
            "ci95_items": h.get("ci95_items"),
            "seeds": h["seeds"],
        }
        row |= {key: w[key]["late"] for key in ("accuracy", "entropy", "ppl_gap")}
        row |= {f"{key}_total": w[f"{key}_total"] for key in REALLOCATIONS}
        rows.append(row)
    return rows


def _run_entry(r: RunData, out: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "arm": r.run.arm.name,
        "seed": r.run.seed,
        "run_dir": r.run.run_dir.relative_to(out).as_posix(),  # relative: the report stays true when copied away
        "status": r.status,
        "steps_logged": r.steps_logged,
        "eval": None,
    }
    if r.eval is not None:
        m = r.eval["metrics"]
        entry["eval"] = {key: m[key] for key in ("mean_at_k", "pass_at_k", "maj_at_k", "n_items", "n_samples")}
        entry["eval"]["ci95"] = m["mean_at_k_ci95"]
    return entry


def build_summary(plan: ExperimentPlan, data: dict[str, list[RunData]]) -> dict[str, Any]:
    """Everything the report states, as one JSON-able mapping (``summary.json``; NaN is written as null)."""
    early, late = window_bounds(plan.steps, plan.late_fraction)
    heldout = heldout_summary(plan, data)
    windows = window_summary(plan, data)
    base = read_eval(plan.baseline_dir, baseline_eval_args(plan)) if plan.baseline else None
    baseline = None if base is None else {"mean_at_k": base["metrics"]["mean_at_k"],
                                          "ci95": base["metrics"]["mean_at_k_ci95"]}  # fmt: skip
    curves = {
        arm.name: {
            key: {
                "steps": list(range(1, plan.steps + 1)),
                **aggregate([r.curves[key] for r in data[arm.name] if r.steps_logged], plan.steps),
            }
            for key in METRICS
        }
        for arm in plan.arms
    }
    summary = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": time.time(),
        "plan": plan.to_dict(),
        "metrics": METRICS,
        "early_window": list(early),
        "late_window": list(late),
        "baseline": baseline,
        "runs": [_run_entry(r, plan.out) for arm in plan.arms for r in data[arm.name]],
        "heldout": heldout,
        "windows": windows,
        "checks": mechanism_checks(plan, windows),
        "alpha_sensitivity": alpha_rows(plan, heldout, windows),
        "curves": curves,
    }
    return json_ready(summary)


def json_ready(value: Any) -> Any:
    """A copy with NaN and infinities as None (they are not JSON) and every mapping key a string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
