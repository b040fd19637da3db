"""End to end: ``dipo experiment`` with two arms (dapo, dipo), one seed and two steps of a tiny real model, through
real `dipo run` launches (Redis, learner, reward service, rollout server) and real evaluations; then the same
command again, which finds everything done.

The tiny random model answers nothing correctly, so every group would be all-wrong and carry no signal. A stop
string that random tokens often contain ("e") makes response lengths vary between 1 and 3 tokens; with
max_new_tokens=3 the overlong penalty then separates a 3-token response from shorter ones, so most groups carry
a DAPO signal and the learner gets its batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from model_factories import save_tiny_llama

from runner.experiment.report import SECTIONS
from runner.experiment.stats import METRICS

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OVERRIDES = [
    "sampling.max_new_tokens=3",
    "sampling.stop=[e]",
    "learner.steps=2",
    "learner.checkpoint_every=2",
    "learner.prompts_per_step=2",
]


def experiment(model: Path, out: Path) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "runner.cli",
        "experiment",
        "configs/quickstart.yaml",
        "--arms",
        "dapo,dipo",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--eval-items",
        "4",
        "--eval-samples",
        "2",
        "--no-baseline",
    ]
    for item in [f"model.name_or_path={model}", *OVERRIDES]:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=540, check=False, env=env)


@pytest.mark.timeout(600)
def test_tiny_experiment_trains_both_arms_and_writes_a_complete_report(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "exp"
    result = experiment(model, out)
    runs = {arm: out / "runs" / f"{arm}-s0" for arm in ("dapo", "dipo")}
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("runs/*/logs/*.log")))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-3000:]}\n{logs}"

    # each arm trained with its own settings on the same data order and seeds
    configs = {arm: yaml.safe_load((folder / "config.yaml").read_text()) for arm, folder in runs.items()}
    assert (configs["dapo"]["learner"]["alpha"], configs["dapo"]["reward"]["dipo"]["enabled"]) == (0.0, False)
    assert (configs["dipo"]["learner"]["alpha"], configs["dipo"]["reward"]["dipo"]["enabled"]) == (0.1, True)
    for key in ("data", "sampling"):
        assert configs["dapo"][key] == configs["dipo"][key]
    for arm, folder in runs.items():
        assert (folder / "done").is_file(), arm
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        evaluation = json.loads((folder / "eval.json").read_text())
        assert evaluation["model"] == str(folder / "checkpoints" / "step-000002")
        assert evaluation["metrics"]["n_items"] == 4 and evaluation["metrics"]["n_samples"] == 8

    # the report: both arms, every metric, every table and plot
    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert [arm["name"] for arm in summary["plan"]["arms"]] == ["dapo", "dipo"]
    assert [(r["arm"], r["status"], r["steps_logged"]) for r in summary["runs"]] == [
        ("dapo", "done", 2),
        ("dipo", "done", 2),
    ]
    for arm in ("dapo", "dipo"):
        assert summary["heldout"][arm]["n_runs"] == 1 and summary["heldout"][arm]["n_items"] == 4
        low, high = summary["heldout"][arm]["ci95_items"]
        assert low <= summary["heldout"][arm]["mean_at_k"] <= high
        assert set(summary["curves"][arm]) == set(METRICS)
        assert summary["curves"][arm]["entropy"]["n"] == [1, 1]  # a value at both steps
        assert summary["windows"][arm]["entropy"]["late"]["mean"] is not None
    assert [c["id"] for c in summary["checks"]] == ["figure7_perplexity_gap"]
    page, markdown = (report / "index.html").read_text(), (report / "summary.md").read_text()
    for text in (page, markdown):
        for heading in (
            "Held-out accuracy (mean@2)",
            "Late in training",
            "Mechanism checks",
            "Runs",
            *[s.title for s in SECTIONS],
            "Figure 7",
        ):
            assert heading in text, heading
        assert "arm dapo:" in text and "arm dipo:" in text
        assert all(label in text for label in METRICS.values())
    for name in ["heldout.png", "figure7_perplexity.png", *[s.file for s in SECTIONS]]:
        assert (report / name).read_bytes().startswith(PNG_SIGNATURE), name

    # the same command again: nothing is trained or evaluated twice
    before = {arm: (folder / "metrics.jsonl").read_text() for arm, folder in runs.items()}
    again = experiment(model, out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("trained already, skipped") == 2 and again.stdout.count("cached in") == 2
    assert {arm: (folder / "metrics.jsonl").read_text() for arm, folder in runs.items()} == before
