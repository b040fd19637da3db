"""learner.trackers without the tracker packages: nothing tracked by default, a missing package named with its
extra, a failing tracker tolerated and switched off, and the values each tracker gets from a metrics.jsonl line.
(The trackers themselves are written and read back for real in tests/integration/test_trackers.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from learner import trackers as trackers_module
from learner.trackers import MAX_CONSECUTIVE_FAILURES, Trackers, TrackerUnavailable, numeric_values
from services.config import load_config

# What each tracker imports first: hiding it makes the import fail as an uninstalled package does.
IMPORTS = {"tensorboard": ["tensorboard", "torch.utils.tensorboard"], "wandb": ["wandb"],
           "mlflow": ["mlflow", "mlflow.tracking", "mlflow.entities"], "trackio": ["trackio"]}  # fmt: skip


def _cfg(tmp_path: Path, *trackers: str):  # noqa: ANN202 - a RunConfig
    names = ", ".join(trackers)
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"learner.trackers=[{names}]"], environ={})


def test_no_trackers_by_default_and_every_call_is_a_no_op(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"], environ={})
    assert cfg.learner.trackers == []
    trackers = Trackers.from_config(cfg, cfg.resolved_run_dir)
    trackers.log_step({"step": 1, "loss": 0.5}, 1)
    trackers.log_artifacts(tmp_path)
    trackers.close()
    assert not (tmp_path / "run").exists(), "nothing is written when nothing is tracked"


@pytest.mark.parametrize("tracker", sorted(IMPORTS))
def test_a_missing_tracker_package_names_the_extra_to_install(
    tracker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in IMPORTS[tracker]:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the MLflow tracker would set, restored after
    cfg = _cfg(tmp_path, tracker)
    with pytest.raises(TrackerUnavailable, match=rf"pip install 'dipo\[{tracker}\]'"):
        Trackers.from_config(cfg, cfg.resolved_run_dir)


def test_trackers_are_named_once() -> None:
    with pytest.raises(ValueError, match="lists a tracker twice"):
        load_config(None, ["learner.trackers=[wandb, wandb]"], environ={})
    with pytest.raises(ValueError, match="trackers"):
        load_config(None, ["learner.trackers=[neptune]"], environ={})


def test_every_finite_number_of_a_line_is_logged_and_nothing_else() -> None:
    line = {"step": 3, "loss": 0.25, "ppl_correct": None, "tau": float("nan"), "skipped": True, "name": "x"}
    assert numeric_values(line) == {"step": 3.0, "loss": 0.25, "skipped": 1.0}


class _Recorder:
    """A tracker that keeps what it was given, and fails on demand."""

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[list[str], int]] = []
        self.closed: list[str] = []

    def log_step(self, values: dict[str, float], step: int) -> None:
        if self.failing:
            raise ConnectionError("tracking server unreachable")
        self.steps.append((step, values))

    def log_images(self, images: list[Path], step: int) -> None:
        self.images.append(([p.name for p in images], step))

    def log_files(self, folder: Path) -> None:
        """Keeps nothing."""

    def close(self, status: str) -> None:
        self.closed.append(status)


def test_a_failing_tracker_is_counted_then_switched_off_while_the_others_go_on(tmp_path: Path) -> None:
    good, bad = _Recorder(), _Recorder(failing=True)
    trackers = Trackers({"good": good, "bad": bad}, tmp_path)
    for step in range(1, MAX_CONSECUTIVE_FAILURES + 3):
        trackers.log_step({"loss": 1.0 / step}, step)
    assert [step for step, _ in good.steps] == list(range(1, MAX_CONSECUTIVE_FAILURES + 3))
    assert trackers.failures == {"bad": MAX_CONSECUTIVE_FAILURES} and "bad" not in trackers.trackers
    trackers.close("stopped")
    assert good.closed == ["stopped"] and bad.closed == []


def test_artifacts_are_logged_at_the_last_step_and_close_checks_its_status(tmp_path: Path) -> None:
    recorder = _Recorder()
    trackers = Trackers({"r": recorder}, tmp_path)
    (tmp_path / "report").mkdir()
    for name in ("reward.png", "accuracy.png", "report.html"):
        (tmp_path / "report" / name).write_bytes(b"x")
    trackers.log_step({"loss": 0.1}, 7)
    trackers.log_artifacts(tmp_path / "report")
    trackers.log_artifacts(tmp_path / "no-such-folder")
    assert recorder.images == [(["accuracy.png", "reward.png"], 7)]
    with pytest.raises(ValueError, match="status"):
        trackers.close("crashed")


def test_the_registry_covers_every_configurable_tracker() -> None:
    from typing import get_args

    from services.config import TrackerName

    assert set(trackers_module.TRACKERS) == set(get_args(TrackerName))
