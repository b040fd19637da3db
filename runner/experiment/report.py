"""The comparison report of ``dipo experiment``: ``<out>/report/index.html``, ``summary.md``, ``summary.json`` and
PNG plots, rebuilt from the run folders after every run (and by ``dipo experiment ... --report-only``).

The numbers come from runner/experiment/stats.py (its docstring defines the windows and intervals); this module
only lays them out. Tables are built once and rendered twice, as HTML and as Markdown. The plots follow
runner/report.py: bare matplotlib Figures on the Agg canvas, one PNG each. A curve is the mean over an arm's seeds
with a band from the lowest to the highest seed, after a trailing moving average of ``max(1, S // 10)`` steps per
seed; the late window is shaded. Nothing here fails on missing data: an empty series is drawn as "no data".
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from runner.experiment.plan import ExperimentPlan
from runner.experiment.stats import (
    METRICS,
    REALLOCATIONS,
    Estimate,
    RunData,
    aggregate,
    build_summary,
    describe,
    load_runs,
    moving_average,
    window_bounds,
)
from services.contracts import MetricKey as K


@dataclass
class Table:
    """A table of the report: a title, an optional note under it, string cells."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(interval: Sequence[float] | None) -> str:
    return "-" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _est(data: dict[str, Any], digits: int = 3) -> str:
    return describe(Estimate.from_dict(data), digits)


# --- tables ---------------------------------------------------------------------------------------------------------


def heldout_table(plan: ExperimentPlan, summary: dict[str, Any]) -> Table:
    """mean@K per arm with its intervals, and the difference to the reference arm."""
    k, reference = plan.eval.samples, plan.arms[0].name
    rows = []
    for arm in plan.arms:
        h = summary["heldout"][arm.name]
        vs = h.get("vs_reference")
        rows.append(
            [
                arm.name,
                str(h["n_runs"]),
                _num(h.get("mean_at_k")),
                _ci(h.get("ci95_items")),
                _est(h["seeds"]),
                _num(h.get("pass_at_k")),
                _num(h.get("maj_at_k")),
                "-" if vs is None else f"{vs['diff']:+.3f} {_ci(vs['ci95_items'])}",
                "-" if vs is None else _est(vs["seeds"]),
            ]
        )
    data = plan.eval.data or "the held-out set of the config's data section"
    note = (
        f"{data}: the first {plan.eval.items} items (per category), {k} samples each, sampling seed "
        f"{plan.eval.seed}, the same for every run. Intervals: bootstrap over items of the accuracy pooled over "
        "seeds (items x samples), and Student t over the seeds' mean@K."
    )
    base = summary["baseline"]
    if base:
        note += f" The base model before training: mean@{k} {_num(base['mean_at_k'])} {_ci(base['ci95'])}."
    headers = [
        "arm",
        "runs",
        f"mean@{k}",
        "95% CI (items x samples)",
        "over seeds [95% CI]",
        f"pass@{k}",
        f"maj@{k}",
        f"minus {reference} [95% CI items]",
        f"minus {reference} over seeds",
    ]
    return Table(f"Held-out accuracy (mean@{k})", headers, rows, note)


def window_table(plan: ExperimentPlan, summary: dict[str, Any]) -> Table:
    """Every metric's late-window value per arm (mean over seeds with its interval), plus total reallocations."""
    windows = summary["windows"]
    first, last = summary["late_window"]
    rows = [[label, *[_est(windows[a.name][key]["late"]) for a in plan.arms]] for key, label in METRICS.items()]
    for key in REALLOCATIONS:
        label = f"reallocations in the run: {key.removeprefix('realloc_')}"
        rows.append([label, *[_est(windows[a.name][f"{key}_total"], 1) for a in plan.arms]])
    early = summary["early_window"]
    note = (
        f"Mean over steps {first}-{last}: the last {last - first + 1} of {plan.steps} steps (late fraction "
        f"{plan.late_fraction:.3g}, rounded up; the early window is steps {early[0]}-{early[1]}). Each cell: "
        "mean over seeds [Student-t 95% CI over seeds] (n = seeds with data)."
    )
    return Table("Late in training", ["metric", *[a.name for a in plan.arms]], rows, note)


def checks_table(summary: dict[str, Any]) -> Table:
    """The paper's mechanism checks, with verdict and numbers."""
    rows = [[c["title"], c["expected"], c["verdict"], c["detail"]] for c in summary["checks"]]
    note = "" if rows else "Needs the arms reward-only and penalty-only (Figure 5), or dipo and dapo (Figure 7)."
    return Table("Mechanism checks (late window)", ["check", "expected", "verdict", "numbers"], rows, note)


def alpha_table(plan: ExperimentPlan, summary: dict[str, Any]) -> Table:
    """Held-out accuracy and late-window figures against alpha."""
    k = plan.eval.samples
    headers = [
        "arm",
        "alpha",
        f"mean@{k} [95% CI items]",
        "over seeds",
        "late accuracy",
        "late entropy",
        "late ppl gap",
        "reallocations reward / penalty",
    ]
    rows = []
    for r in summary["alpha_sensitivity"]:
        reallocations = " / ".join(_num(r[f"{key}_total"]["mean"], 1) for key in REALLOCATIONS)
        rows.append(
            [
                r["arm"],
                f"{r['alpha']:g}",
                "-" if r["mean_at_k"] is None else f"{_num(r['mean_at_k'])} {_ci(r['ci95_items'])}",
                _est(r["seeds"]),
                _est(r[K.ACCURACY]),
                _est(r[K.ENTROPY]),
                _est(r["ppl_gap"]),
                reallocations,
            ]
        )
    note = "DAPO is the alpha 0 row. Late: the late window." if rows else "Needs an alpha=X arm."
    return Table("Alpha sensitivity", headers, rows, note)


def runs_table(plan: ExperimentPlan, summary: dict[str, Any]) -> Table:
    """Every planned run: status, steps logged, its own held-out figure."""
    rows = []
    for r in summary["runs"]:
        heldout = "-" if r["eval"] is None else f"{_num(r['eval']['mean_at_k'])} {_ci(r['eval']['ci95'])}"
        rows.append([r["arm"], str(r["seed"]), r["status"], str(r["steps_logged"]), heldout, r["run_dir"]])
    headers = ["arm", "seed", "status", "steps logged", f"mean@{plan.eval.samples} [95% CI items]", "folder"]
    return Table("Runs", headers, rows)


def all_tables(plan: ExperimentPlan, summary: dict[str, Any]) -> list[Table]:
    """Every table, in page order."""
    return [
        heldout_table(plan, summary),
        window_table(plan, summary),
        checks_table(summary),
        alpha_table(plan, summary),
        runs_table(plan, summary),
    ]


# --- plots ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One figure of per-step curves: a subplot per metric, a line per arm with its band over seeds."""

    file: str
    title: str
    keys: tuple[str, ...]
    cumulative: bool = False
    arms: tuple[str, ...] = ()  # only these arms; empty: every arm


SECTIONS = (
    Section("accuracy_reward.png", "Training accuracy and reward", (K.ACCURACY, K.REWARD_MEAN)),
    Section("entropy.png", "Policy entropy", ("entropy",)),
    Section("group_kinds.png", "Share of easy / normal / hard groups", (K.KIND_EASY, K.KIND_NORMAL, K.KIND_HARD)),
    Section("reallocations.png", "Reallocations by direction (cumulative)", REALLOCATIONS, cumulative=True),
    Section("tau_gate.png", "Perplexity threshold tau* and gate", (K.TAU, K.GATE_OPEN_RATIO)),
    Section("perplexity.png", "Perplexity of correct and wrong responses", (K.PPL_CORRECT, K.PPL_WRONG, "ppl_gap")),
)
"""The curve figures every report has (the metric sections)."""
MECHANISM_SECTIONS = (
    Section(
        "figure5_entropy.png",
        "Figure 5: entropy, reward-only vs penalty-only",
        ("entropy",),
        arms=("reward-only", "penalty-only"),
    ),
    Section(
        "figure7_perplexity.png",
        "Figure 7: perplexity of correct and wrong responses, DiPO vs DAPO",
        ("ppl_correct", "ppl_wrong", "ppl_gap"),
        arms=("dipo", "dapo"),
    ),
)
"""Figures drawn only when their arms are planned."""
SHARES = frozenset({"accuracy", "kind_easy", "kind_normal", "kind_hard", "gate_open_ratio"})
"""Metrics that are shares: their axes run from 0 to 1."""


def _seed_arrays(runs: list[RunData], key: str, steps: int, cumulative: bool) -> list[np.ndarray]:
    """Each started run's series as plotted: cumulative sums, or a trailing moving average of S // 10 steps."""
    started = [r for r in runs if r.steps_logged]
    if not cumulative:
        return [moving_average(r.curves[key], max(1, steps // 10)) for r in started]
    arrays = []
    for r in started:
        values = r.curves[key]
        total = np.where(np.isfinite(values), values, 0.0).cumsum()
        last = int(np.flatnonzero(np.isfinite(values)).max(initial=-1)) + 1
        arrays.append(np.where(np.arange(steps) < last, total, np.nan))
    return arrays


def _draw_curves(ax: Axes, section: Section, key: str, plan: ExperimentPlan, data: dict[str, list[RunData]]) -> None:
    steps = np.arange(1, plan.steps + 1)
    drawn = 0
    for i, arm in enumerate(plan.arms):
        if section.arms and arm.name not in section.arms:
            continue
        arrays = _seed_arrays(data[arm.name], key, plan.steps, section.cumulative)
        if not any(np.isfinite(a).any() for a in arrays):
            continue
        agg = {name: np.array(values, dtype=np.float64) for name, values in aggregate(arrays, plan.steps).items()}
        label = f"{arm.name} ({len(arrays)} seed{'s' if len(arrays) > 1 else ''})"
        ax.plot(steps, agg["mean"], color=f"C{i % 10}", marker="o", markersize=2, label=label)
        if len(arrays) > 1:
            ax.fill_between(steps, agg["min"], agg["max"], color=f"C{i % 10}", alpha=0.2, linewidth=0)
        drawn += 1
    first, last = window_bounds(plan.steps, plan.late_fraction)[1]
    ax.axvspan(first - 0.5, last + 0.5, color="gray", alpha=0.1)
    ax.set_xlim(0.5, plan.steps + 0.5)
    if key in SHARES and not section.cumulative:
        ax.set_ylim(-0.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(METRICS[key], fontsize="small")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize="x-small")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray")


def draw_section(fig: Figure, section: Section, plan: ExperimentPlan, data: dict[str, list[RunData]]) -> None:
    """One subplot per metric of the section."""
    for ax, key in zip(fig.subplots(1, len(section.keys), squeeze=False)[0], section.keys, strict=True):
        _draw_curves(ax, section, key, plan, data)
    smoothing = "" if section.cumulative or plan.steps < 20 else f"moving average over {plan.steps // 10} steps; "
    fig.supxlabel(f"{smoothing}band: lowest to highest seed; shaded: the late window", fontsize="x-small")


def draw_heldout(fig: Figure, plan: ExperimentPlan, summary: dict[str, Any]) -> None:
    """A bar per arm (pooled over seeds, 95 % interval over items x samples), a dot per seed, the base model."""
    ax = fig.subplots()
    for i, arm in enumerate(plan.arms):
        h = summary["heldout"][arm.name]
        if h.get("mean_at_k") is None:
            ax.text(i, 0.02, "no evaluation", ha="center", color="gray", fontsize="small")
            continue
        mean, (low, high) = h["mean_at_k"], h["ci95_items"]
        ax.bar(i, mean, color=f"C{i % 10}", alpha=0.7, yerr=[[mean - low], [high - mean]], capsize=6)
        seeds = [v for v in h["per_seed"].values() if v is not None]
        ax.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3)
    tops = [h["ci95_items"][1] for h in summary["heldout"].values() if h.get("ci95_items")]
    tops += [v for h in summary["heldout"].values() for v in h["per_seed"].values() if v is not None]
    if summary["baseline"]:
        ax.axhline(summary["baseline"]["mean_at_k"], color="gray", linestyle="--", label="base model")
        ax.legend(loc="best", fontsize="small")
        tops.append(summary["baseline"]["ci95"][1])
    ax.set_ylim(0, min(1.0, 1.15 * max(tops)) if tops and max(tops) > 0 else 1.0)
    ax.set_xticks(range(len(plan.arms)), [a.name for a in plan.arms])
    ax.set_ylabel(f"held-out mean@{plan.eval.samples}")
    ax.set_title("bars: pooled over seeds with a 95% CI over items x samples; dots: seeds", fontsize="small")
    ax.grid(alpha=0.3, axis="y")


def _save(fig: Figure, title: str, target: Path) -> None:
    fig.suptitle(title)
    fig.savefig(target, format="png", dpi=100)


def draw_all(
    folder: Path, plan: ExperimentPlan, data: dict[str, list[RunData]], summary: dict[str, Any]
) -> list[Section]:
    """Write every PNG into ``folder``; the figures in page order (the held-out bars first)."""
    for stale in folder.glob("*.png"):  # figures of an earlier build that this one may not redraw
        stale.unlink()
    # a bare Figure renders with the Agg canvas and touches no pyplot global state (as in runner/report.py)
    fig = Figure(figsize=(max(6.0, 1.3 * len(plan.arms) + 2), 4), layout="constrained")
    draw_heldout(fig, plan, summary)
    _save(fig, "Held-out accuracy", folder / "heldout.png")
    names = {arm.name for arm in plan.arms}
    sections = list(SECTIONS) + [s for s in MECHANISM_SECTIONS if set(s.arms) <= names]
    for section in sections:
        fig = Figure(figsize=(4.5 * len(section.keys) + 1, 4), layout="constrained")
        draw_section(fig, section, plan, data)
        _save(fig, section.title, folder / section.file)
    return [Section("heldout.png", "Held-out accuracy", ()), *sections]


# --- pages ----------------------------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when below it (the report is read elsewhere), else as it is."""
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def _intro(plan: ExperimentPlan, summary: dict[str, Any]) -> list[str]:
    early, late = summary["early_window"], summary["late_window"]
    seeds = ", ".join(map(str, plan.seeds))
    lines = [
        f"config {_shown(plan.config)}; {plan.steps} steps per run; seeds {seeds} (learner.seed and sampling.seed; "
        f"data.seed as in the config, so every run sees the prompts in the same order)",
        f"late window: steps {late[0]}-{late[1]}; early window: steps {early[0]}-{early[1]}",
    ]
    if plan.overrides:
        lines.append("overrides of every run: " + " ".join(plan.overrides))
    return lines + [f"arm {arm.name}: {arm.description}" for arm in plan.arms]


def _md_table(table: Table) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"## {table.title}", ""] + ([table.note, ""] if table.note else [])
    if table.rows:  # a table without rows is its note alone
        lines += ["| " + " | ".join(map(cell, table.headers)) + " |", "|" + " --- |" * len(table.headers)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def render_markdown(plan: ExperimentPlan, summary: dict[str, Any], tables: list[Table], figures: list[Section]) -> str:
    """summary.md: the set-up, every table, links to the plots."""
    parts = [f"# dipo experiment: {plan.out.name}", "", *[f"- {line}" for line in _intro(plan, summary)], ""]
    parts += [_md_table(table) for table in tables]
    parts += ["## Plots", "", *[f"![{f.title}]({f.file})" for f in figures], ""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}"""


def _html_table(table: Table) -> str:
    esc = html.escape
    parts = [f"<h2>{esc(table.title)}</h2>"] + ([f"<p>{esc(table.note)}</p>"] if table.note else [])
    if not table.rows:
        return "\n".join(parts)
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.headers) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows]
    return "\n".join(parts + ["</table>"])


def render_html(plan: ExperimentPlan, summary: dict[str, Any], tables: list[Table], figures: list[Section]) -> str:
    """index.html: the set-up, the tables, the plots, and links to each run's own report."""
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>dipo experiment {esc(plan.out.name)}</title>",
        f"<style>{_CSS}</style></head><body><h1>dipo experiment: {esc(plan.out.name)}</h1><ul>",
        *[f"<li>{esc(line)}</li>" for line in _intro(plan, summary)],
        "</ul>",
    ]
    parts += [_html_table(table) for table in tables]
    parts.append("<h2>Plots</h2>")
    parts += [f"<h3>{esc(f.title)}</h3><img src='{esc(f.file)}' alt='{esc(f.title)}'>" for f in figures]
    parts.append("<h2>Reports of the runs</h2><ul>")
    for run in plan.runs:
        href = f"../{run.run_dir.relative_to(plan.out).as_posix()}/report/report.html"
        parts.append(f"<li><a href='{esc(href)}'>{esc(run.label)}</a></li>")
    return "\n".join(parts + ["</ul></body></html>\n"])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_experiment_report(plan: ExperimentPlan) -> Path:
    """Write ``<out>/report/`` (index.html, summary.md, summary.json, PNGs) from what the runs hold now."""
    folder = plan.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    data = load_runs(plan)
    summary = build_summary(plan, data)
    figures = draw_all(folder, plan, data, summary)
    tables = all_tables(plan, summary)
    _write(folder / "summary.json", json.dumps(summary, indent=1, allow_nan=False) + "\n")
    _write(folder / "summary.md", render_markdown(plan, summary, tables, figures))
    _write(folder / "index.html", render_html(plan, summary, tables, figures))
    return folder / "index.html"
