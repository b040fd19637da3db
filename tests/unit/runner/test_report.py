"""The run report: HTML plus PNG plots from metrics.jsonl, robust to nulls, missing keys and short files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from runner.report import PLOTS, build_report, read_metrics, series, summary_rows
from services.config import RunConfig, write_resolved_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# every key METRICS.md lists for metrics.jsonl
METRIC_KEYS = (
    "step version time elapsed_s loss grad_norm lr reward_mean accuracy entropy clip_low clip_high is_weight_mean "
    "is_weight_max kl_behaviour tau gate_open_ratio kind_easy kind_normal kind_hard realloc_reward realloc_penalty "
    "ppl_correct ppl_wrong quad_CL quad_CH quad_EL quad_EH staleness_mean staleness_max groups_used groups_consumed "
    "dropped_stale dropped_no_signal dropped_duplicate prompts_released tokens gen_tokens_per_s step_seconds "
    "wait_seconds sync_seconds checkpoint_seconds"
).split()


def metrics_line(step: int) -> dict[str, Any]:
    """A plausible metrics.jsonl line with every documented key."""
    line: dict[str, Any] = {key: 0.5 for key in METRIC_KEYS}
    line |= {
        "step": step,
        "version": step,
        "time": 1_700_000_000.0 + 10 * step,
        "elapsed_s": 10.0 * step,
        "accuracy": 0.2 + 0.05 * step,
        "reward_mean": -0.6 + 0.1 * step,
        "kind_easy": 0.1,
        "kind_normal": 0.6,
        "kind_hard": 0.3,
        "realloc_reward": step % 3,
        "realloc_penalty": step % 2,
        "dropped_stale": step,
        "groups_used": 4,
    }
    return line


def write_metrics(run_dir: Path, lines: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def image_sources(page: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", page)


def test_ten_lines_with_nulls_give_every_plot(tmp_path: Path) -> None:
    lines = [metrics_line(step) for step in range(1, 11)]
    lines[0]["ppl_correct"] = None  # no correct response in step 1
    lines[3]["tau"] = None  # gate closed, no fit yet
    del lines[5]["entropy"]  # an older learner without the key
    for line in lines:
        line["ppl_wrong"] = None  # a series with no data at all
    write_metrics(tmp_path, lines)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "learner.log").write_text("hello\n")
    (tmp_path / "checkpoints" / "step-000010").mkdir(parents=True)

    report = build_report(tmp_path)

    assert report == tmp_path / "report" / "report.html"
    page = report.read_text()
    sources = image_sources(page)
    assert sorted(sources) == sorted(spec.file for spec in PLOTS)
    for source in sources:
        assert_valid_png(report.parent / source)
    assert "../logs/learner.log" in page
    assert "../checkpoints/step-000010/" in page
    assert "0.250 / 0.700" in page  # accuracy initial / final


def test_empty_metrics_file_says_so(tmp_path: Path) -> None:
    write_metrics(tmp_path, [])
    page = build_report(tmp_path).read_text()
    assert image_sources(page) == []
    assert "no steps yet" in page
    assert not list((tmp_path / "report").glob("*.png"))


def test_missing_metrics_file_and_config(tmp_path: Path) -> None:
    page = build_report(tmp_path).read_text()
    assert "no steps yet" in page


def test_single_line_draws_one_point_per_plot(tmp_path: Path) -> None:
    write_metrics(tmp_path, [metrics_line(1)])
    page = build_report(tmp_path).read_text()
    assert len(image_sources(page)) == len(PLOTS)
    assert "single step" in page
    for spec in PLOTS:
        assert_valid_png(tmp_path / "report" / spec.file)


def test_a_line_with_only_a_step_still_plots(tmp_path: Path) -> None:
    write_metrics(tmp_path, [{"step": 1}, {"step": 2}])
    page = build_report(tmp_path).read_text()
    assert len(image_sources(page)) == len(PLOTS)


def test_rebuild_replaces_plots_of_an_earlier_build(tmp_path: Path) -> None:
    write_metrics(tmp_path, [metrics_line(1), metrics_line(2)])
    build_report(tmp_path)
    write_metrics(tmp_path, [])
    build_report(tmp_path)
    assert not list((tmp_path / "report").glob("*.png"))


def test_summary_reads_config_highlights(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({"name": "sumrun", "learner": {"steps": 7, "alpha": 0.25}})
    write_resolved_config(cfg, tmp_path)
    write_metrics(tmp_path, [metrics_line(1), metrics_line(2)])
    page = build_report(tmp_path).read_text()
    assert "dipo run: sumrun" in page
    assert "<tr><th>learner.steps</th><td>7</td></tr>" in page
    assert "<tr><th>learner.alpha</th><td>0.250</td></tr>" in page


def test_read_metrics_keeps_last_line_per_step_and_counts_bad_lines(tmp_path: Path) -> None:
    # a restarted learner re-trains the steps after its last checkpoint and writes them again
    text = "\n".join(
        [
            json.dumps({"step": 1, "accuracy": 0.1}),
            json.dumps({"step": 2, "accuracy": 0.2}),
            "{not json",
            json.dumps({"no_step": 1}),
            json.dumps({"step": 2, "accuracy": 0.3}),
            "",
        ]
    )
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 3, "acc')  # a half-written last line
    rows, bad = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[1]["accuracy"] == 0.3
    assert bad == 3


def test_series_maps_missing_and_non_numbers_to_nan() -> None:
    values = series([{"x": 1}, {"x": None}, {}, {"x": "a"}, {"x": True}, {"x": 2.5}], "x")
    assert values[0] == 1.0 and values[5] == 2.5
    assert all(math.isnan(v) for v in values[1:5])


@pytest.mark.parametrize("rows", [[], [{"step": 1}]])
def test_summary_rows_tolerate_missing_everything(rows: list[dict[str, Any]]) -> None:
    summary = dict(summary_rows(rows, {}, 0))
    assert summary["accuracy: initial / final"] == "- / -"
    assert summary["steps written"] == str(len(rows))
