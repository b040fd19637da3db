"""The run report: ``<run_dir>/report/report.html`` with PNG plots of ``metrics.jsonl`` and a summary table.

Built by ``dipo run`` at the end of a run and rebuilt by ``dipo report RUN_DIR``. Every reader tolerates missing
keys, nulls and a short (or empty) metrics file: a series without values is drawn as "no data", never an error.
Lines repeated after a learner restart (it resumes from its last checkpoint and re-trains the steps after it) are
collapsed to the last line written for each step.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from services.config import ConfigError, read_yaml
from services.contracts import MetricKey as K
from services.contracts import RunFolder

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class PlotSpec:
    """One PNG of the report."""

    file: str
    title: str
    draw: Callable[[Figure, Rows], None]


def read_metrics(path: Path) -> tuple[Rows, int]:
    """The rows of a metrics.jsonl, one per step (the last written wins), by step; and the unreadable line count."""
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        step = row.get(K.STEP) if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int | float):
            bad += 1
            continue
        by_step[int(step)] = row
    return [by_step[s] for s in sorted(by_step)], bad


def series(rows: Rows, key: str) -> list[float]:
    """The values of ``key`` as floats, NaN where missing, null or not a number (matplotlib leaves gaps there)."""
    out = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append(float(value))
        else:
            out.append(math.nan)
    return out


def _steps(rows: Rows) -> list[float]:
    return [float(row[K.STEP]) for row in rows]


def _has_data(values: Sequence[float]) -> bool:
    return any(not math.isnan(v) for v in values)


def _lines(ax: Axes, rows: Rows, keys: Sequence[tuple[str, str]], ylabel: str) -> None:
    """Plot keys (with labels) against the step on one axes; note series without data."""
    steps, missing = _steps(rows), []
    for key, label in keys:
        values = series(rows, key)
        if _has_data(values):
            ax.plot(steps, values, marker="o", markersize=3, label=label)
        else:
            missing.append(label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if missing:
        ax.text(0.5, 0.5, "no data: " + ", ".join(missing), transform=ax.transAxes, ha="center", color="gray")
    if len(missing) < len(keys):
        ax.legend(loc="best", fontsize="small")


def _draw_reward(fig: Figure, rows: Rows) -> None:
    _lines(fig.subplots(), rows, [(K.REWARD_MEAN, "reward (mean R)"), (K.ACCURACY, "accuracy")], "value")


def _draw_perplexity(fig: Figure, rows: Rows) -> None:
    _lines(fig.subplots(), rows, [(K.PPL_CORRECT, "correct responses"), (K.PPL_WRONG, "wrong responses")],
           "mean perplexity")  # fmt: skip


def _draw_tau(fig: Figure, rows: Rows) -> None:
    ax = fig.subplots()
    _lines(ax, rows, [(K.TAU, "tau*")], "tau* (perplexity threshold)")
    gate = series(rows, K.GATE_OPEN_RATIO)
    if _has_data(gate):
        twin = ax.twinx()
        twin.plot(_steps(rows), gate, color="tab:gray", linestyle="--", marker=".", label="gate open ratio")
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel("gate open ratio")
        twin.legend(loc="lower right", fontsize="small")


def _draw_kinds(fig: Figure, rows: Rows) -> None:
    ax = fig.subplots()
    shares = [[0.0 if math.isnan(v) else v for v in series(rows, f"kind_{k}")] for k in ("easy", "normal", "hard")]
    steps = _steps(rows)
    if len(steps) == 1:  # a stack plot of one point is invisible
        bottom = 0.0
        for values, label in zip(shares, ("easy", "normal", "hard"), strict=True):
            ax.bar(steps, values, bottom=bottom, label=label, width=0.6)
            bottom += values[0]
    else:
        ax.stackplot(steps, *shares, labels=["easy (all correct)", "normal (mixed)", "hard (all wrong)"], alpha=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("share of consumed groups")
    ax.legend(loc="upper right", fontsize="small")


def _draw_reallocations(fig: Figure, rows: Rows) -> None:
    ax = fig.subplots()
    steps = _steps(rows)
    up = [0.0 if math.isnan(v) else v for v in series(rows, K.REALLOC_REWARD)]
    down = [0.0 if math.isnan(v) else v for v in series(rows, K.REALLOC_PENALTY)]
    ax.bar([s - 0.2 for s in steps], up, width=0.4, label="reward (hard groups, exploration)", color="tab:green")
    ax.bar([s + 0.2 for s in steps], down, width=0.4, label="penalty (easy groups, exploitation)", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("reallocations per step")
    ax.set_title(f"total: {sum(up):.0f} reward, {sum(down):.0f} penalty", fontsize="small")
    ax.legend(loc="upper right", fontsize="small")


def _draw_entropy(fig: Figure, rows: Rows) -> None:
    _lines(fig.subplots(), rows, [(K.ENTROPY, "mean token entropy")], "nats")


def _draw_throughput(fig: Figure, rows: Rows) -> None:
    top, bottom = fig.subplots(2, 1, sharex=True)
    _lines(top, rows, [(K.GEN_TOKENS_PER_S, "generated tokens/s")], "tokens/s")
    _lines(bottom, rows, [(K.STEP_SECONDS, "step"), (K.WAIT_SECONDS, "waiting for groups")], "seconds")


PLOTS = (
    PlotSpec("reward_accuracy.png", "Reward and accuracy", _draw_reward),
    PlotSpec("perplexity.png", "Perplexity of correct and wrong responses", _draw_perplexity),
    PlotSpec("tau.png", "Perplexity threshold tau* and gate", _draw_tau),
    PlotSpec("group_kinds.png", "Group kinds", _draw_kinds),
    PlotSpec("reallocations.png", "Reward reallocations by direction", _draw_reallocations),
    PlotSpec("entropy.png", "Policy entropy", _draw_entropy),
    PlotSpec("throughput.png", "Throughput", _draw_throughput),
)


def _save_plot(spec: PlotSpec, rows: Rows, folder: Path) -> Path:
    # a bare Figure renders with the Agg canvas and touches no pyplot global state (safe in any thread)
    fig = Figure(figsize=(7, 4), layout="constrained")
    spec.draw(fig, rows)
    fig.suptitle(spec.title)
    target = folder / spec.file
    fig.savefig(target, format="png", dpi=100)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# summary


def _first_last(rows: Rows, key: str) -> tuple[float | None, float | None]:
    values = [v for v in series(rows, key) if not math.isnan(v)]
    return (values[0], values[-1]) if values else (None, None)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


CONFIG_HIGHLIGHTS = (
    "name", "model.name_or_path", "data.source", "data.dataset", "data.task_kind", "sampling.n",
    "sampling.max_new_tokens", "rollout.backend", "rollout.workers", "reward.replicas", "reward.dipo.enabled",
    "learner.steps", "learner.prompts_per_step", "learner.loss", "learner.alpha", "learner.lr",
    "learner.max_staleness",
)  # fmt: skip


def summary_rows(rows: Rows, config: dict[str, Any], bad_lines: int) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary table."""
    out = [(key, _fmt(_get(config, key))) for key in CONFIG_HIGHLIGHTS]
    last = rows[-1] if rows else {}
    acc0, acc1 = _first_last(rows, K.ACCURACY)
    rew0, rew1 = _first_last(rows, K.REWARD_MEAN)
    times = [v for v in series(rows, K.TIME) if not math.isnan(v)]
    elapsed = [v for v in series(rows, K.ELAPSED_S) if not math.isnan(v)]
    wall = (times[-1] - times[0]) if len(times) > 1 else (elapsed[-1] if elapsed else None)
    used = sum(v for v in series(rows, K.GROUPS_USED) if not math.isnan(v))
    out += [
        ("steps written", str(len(rows))),
        ("last step", _fmt(last.get(K.STEP))),
        ("accuracy: initial / final", f"{_fmt(acc0)} / {_fmt(acc1)}"),
        ("reward: initial / final", f"{_fmt(rew0)} / {_fmt(rew1)}"),
        ("groups used", _fmt(int(used))),
        ("dropped: stale / no signal / duplicate",
         " / ".join(_fmt(last.get(f"dropped_{k}")) for k in ("stale", "no_signal", "duplicate"))),
        ("reallocations: reward / penalty",
         " / ".join(_fmt(int(sum(v for v in series(rows, k) if not math.isnan(v))))
                    for k in ("realloc_reward", "realloc_penalty"))),
        ("wall time", "-" if wall is None else f"{wall:.0f} s ({wall / 3600:.2f} h)"),
    ]  # fmt: skip
    if bad_lines:
        out.append(("unreadable metrics lines", str(bad_lines)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# HTML


def _links(run_dir: Path) -> list[tuple[str, str]]:
    """(href relative to report/, label) for the metrics file, every log and every checkpoint."""
    links = []
    if RunFolder(run_dir).metrics.is_file():
        links.append(("../metrics.jsonl", "metrics.jsonl"))
    if RunFolder(run_dir).config.is_file():
        links.append(("../config.yaml", "config.yaml (resolved, secrets masked)"))
    logs = RunFolder(run_dir).logs
    for path in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        links.append((f"../logs/{path.name}", f"log: {path.name}"))
    ckpts = RunFolder(run_dir).checkpoints
    for path in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        if path.is_dir() and path.name.startswith("step-"):
            links.append((f"../checkpoints/{path.name}/", f"checkpoint: {path.name}"))
    return links


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.note{color:#a60}"""


def render_html(run_name: str, summary: list[tuple[str, str]], images: list[PlotSpec], links: list[tuple[str, str]],
                note: str | None) -> str:  # fmt: skip
    """The report page."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dipo run {esc(run_name)}</title>",
             f"<style>{_CSS}</style></head><body><h1>dipo run: {esc(run_name)}</h1>"]  # fmt: skip
    if note:
        parts.append(f"<p class='note'>{esc(note)}</p>")
    parts.append("<h2>Summary</h2><table>")
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary]
    parts.append("</table>")
    if images:
        parts.append("<h2>Plots</h2>")
        parts += [f"<h3>{esc(p.title)}</h3><img src='{esc(p.file)}' alt='{esc(p.title)}'>" for p in images]
    parts.append("<h2>Files</h2><ul>")
    parts += [f"<li><a href='{esc(href)}'>{esc(label)}</a></li>" for href, label in links]
    parts.append("</ul></body></html>\n")
    return "\n".join(parts)


def build_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report/report.html`` and its PNG plots from metrics.jsonl and config.yaml; its path."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir).report
    folder.mkdir(parents=True, exist_ok=True)
    rows, bad = read_metrics(RunFolder(run_dir).metrics)
    try:
        config = read_yaml(RunFolder(run_dir).config)
    except ConfigError:
        config = {}
    for stale in folder.glob("*.png"):  # plots of an earlier build that this one may not redraw
        stale.unlink()
    images: list[PlotSpec] = []
    note = None
    if rows:
        for spec in PLOTS:
            _save_plot(spec, rows, folder)
            images.append(spec)
        if len(rows) == 1:
            note = "metrics.jsonl holds a single step: the plots show one point each."
    else:
        note = "metrics.jsonl holds no steps yet (the run ended before its first optimizer step): no plots."
    name = str(config.get("name") or run_dir.name)
    page = render_html(name, summary_rows(rows, config, bad), images, _links(run_dir), note)
    target = folder / "report.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(target)
    return target
