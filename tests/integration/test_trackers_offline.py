"""Experiment trackers for real, offline: each one is written by ``learner.trackers`` in a process of its own (two
starts, the second continuing the run after redoing a step, as a resumed learner does) and read back from its local
store with the tracker's own reader: TensorBoard event files, an offline W&B run folder, an MLflow file store,
trackio's SQLite store. A test skips when its tracker's package is not installed (the `tracking` extra)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET = "redis-secret-3f9c"
"""The run's Redis password: masked in the logged config, and written nowhere in a tracker's store."""
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
STARTS = [(1, 3), (3, 4)]
"""The steps each start logs: the second redoes step 3 (the update after the last checkpoint) and adds step 4."""

pytestmark = pytest.mark.timeout(300)

WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from learner.trackers import Trackers
    from services.config import load_config

    run_dir, report, tracker, first, last, secret, result = sys.argv[1:8]
    overrides = ["name=tracked", f"run_dir={run_dir}", f"learner.trackers=[{tracker}]", f"redis.password={secret}",
                 "learner.lr=3e-6"]
    cfg = load_config(None, overrides, environ={})
    trackers = Trackers.from_config(cfg, Path(run_dir))
    for step in range(int(first), int(last) + 1):
        line = {"step": step, "version": step, "loss": 0.5 / step, "quad_CL": 0.25, "ppl_correct": None,
                "time": 1.7e9 + step}
        trackers.log_step(line, step)
    trackers.log_artifacts(Path(report))
    trackers.close("done")
    Path(result).write_text(json.dumps({"failures": trackers.failures}))  # stdout belongs to the trackers
    """
)


def _installed(tracker: str) -> None:
    if importlib.util.find_spec(PACKAGES[tracker]) is None:
        pytest.skip(f"{PACKAGES[tracker]} is not installed (pip install 'dipo[{tracker}]')")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    # offline W&B needs no account; HOME keeps wandb's and trackio's own settings files out of the real home
    return env | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path / "home"),
                  "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # fmt: skip


def _report(folder: Path) -> Path:
    """A report folder like runner/report.py writes: a PNG plot and the HTML page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True)
    figure, axes = plt.subplots(figsize=(2, 1.5), dpi=50)
    axes.plot([1, 2, 3], [0.2, 0.4, 0.5])
    figure.savefig(folder / "reward.png")
    plt.close(figure)
    (folder / "report.html").write_text("<html><img src='reward.png'></html>\n")
    return folder


def _track(tracker: str, tmp_path: Path) -> Path:
    """Both starts of the writer; returns the run folder."""
    run_dir, report = tmp_path / "run", _report(tmp_path / "report")
    for first, last in STARTS:
        result = tmp_path / f"result-{first}.json"
        argv = [sys.executable, "-c", WRITER, str(run_dir), str(report), tracker, str(first), str(last), SECRET,
                str(result)]  # fmt: skip
        done = subprocess.run(argv, env=_env(tmp_path), capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(result.read_text()) == {"failures": {}}
    store = run_dir / "trackers" / tracker
    assert store.is_dir()
    leaked = [str(p) for p in (run_dir / "trackers").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [], "the Redis password reached a tracker's store"
    return run_dir


def _steps(rows: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in rows]


def test_tensorboard_event_files_hold_every_step_the_config_and_the_plots(tmp_path: Path) -> None:
    _installed("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = _track("tensorboard", tmp_path) / "trackers/tensorboard"
    assert len(list(store.glob("events.out.tfevents.*"))) == 2, "one event file per start"
    events = EventAccumulator(str(store), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "quad_CL", "step", "version", "time"} <= set(tags["scalars"])
    assert "ppl_correct" not in tags["scalars"], "a null is no data point"
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert sorted(_steps(loss)) == [1, 2, 3, 3, 4]
    assert dict(loss)[4] == pytest.approx(0.125)
    images = events.Images("report/reward")
    assert [image.step for image in images] == [3, 4], "each start logged the report at its last step"
    assert images[-1].width > 10 and images[-1].height > 10
    (config,) = {e.tensor_proto.string_val[0].decode() for e in events.Tensors("config/text_summary")}
    assert "tracker_project: dipo" in config and "password: '***'" in config


def test_the_command_line_logs_a_report_to_the_run_folders_trackers(tmp_path: Path) -> None:
    _installed("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _track("tensorboard", tmp_path)
    (run_dir / "metrics.jsonl").write_text('{"step": 4}\n{"step": 5}\n')
    argv = [sys.executable, "-m", "learner.trackers", "--set", "name=tracked", "--set", f"run_dir={run_dir}",
            "--set", "learner.trackers=[tensorboard]", "--artifacts", str(tmp_path / "report")]  # fmt: skip
    done = subprocess.run(argv, env=_env(tmp_path), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    events = EventAccumulator(str(run_dir / "trackers/tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("report/reward")] == [3, 4, 5], "at the newest metrics.jsonl step"


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a .wandb file (a W&B header, then LevelDB-log framing in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    payloads, partial = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            payloads.append(chunk)
        elif kind == 2:  # FIRST
            partial = chunk
        elif kind == 3:  # MIDDLE
            partial += chunk
        elif kind == 4:  # LAST
            payloads.append(partial + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def test_wandb_offline_run_folders_continue_one_run(tmp_path: Path) -> None:
    _installed("wandb")
    run_dir = _track("wandb", tmp_path)
    run_id = json.loads((run_dir / "trackers/runs.json").read_text())["wandb"]["id"]
    folders = sorted(glob.glob(str(run_dir / "trackers/wandb/wandb/offline-run-*")))
    assert len(folders) == 2 and all(folder.endswith(f"-{run_id}") for folder in folders), "both starts, one run"
    rows: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    for folder in folders:
        for record in _wandb_records(Path(folder) / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({"/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            elif kind == "run":
                assert (record.run.run_id, record.run.display_name, record.run.project) == (run_id, "tracked", "dipo")
            elif kind == "config":
                configs.append({item.key: json.loads(item.value_json) for item in record.config.update})
    metric_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in metric_rows] == [1, 2, 3, 3, 4], "the learner's step is the x-axis"
    assert metric_rows[-1]["loss"] == pytest.approx(0.125) and metric_rows[-1]["quad_CL"] == 0.25
    (image_row,) = [row for row in rows if "report/reward/_type" in row][-1:]
    assert image_row["report/reward/_type"] == "image-file" and image_row["step"] == 4
    files = Path(folders[-1]) / "files"
    assert (files / image_row["report/reward/path"]).is_file()
    assert (files / "report.html").is_file() and (files / "reward.png").is_file(), "the report is among the files"
    config = {key: value for update in configs for key, value in update.items()}
    assert config["learner"]["lr"] == 3e-6 and config["learner"]["trackers"] == ["wandb"]
    assert config["redis"]["password"] == "***"


def test_mlflow_file_store_holds_one_run_with_metrics_params_and_artifacts(tmp_path: Path, monkeypatch) -> None:
    _installed("mlflow")
    run_dir = _track("mlflow", tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses to open a file store without it
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "trackers/runs.json").read_text())["mlflow"]
    assert state["tracking_uri"] == (run_dir / "trackers/mlflow").resolve().as_uri()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    experiment = client.get_experiment_by_name("dipo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == state["run_id"] and run.info.status == "FINISHED" and run.info.run_name == "tracked"
    loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(_steps(loss)) == [1, 2, 3, 3, 4]
    assert "ppl_correct" not in run.data.metrics and run.data.metrics["quad_CL"] == 0.25
    assert run.data.params["learner.lr"] == "3e-06" and run.data.params["redis.password"] == "***"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "report"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {"report/reward.png",
                                                                                 "report/report.html"}  # fmt: skip


READER = textwrap.dedent(
    """
    import json
    from trackio.sqlite_storage import SQLiteStorage
    found = {"runs": SQLiteStorage.get_runs("dipo"), "logs": SQLiteStorage.get_logs("dipo", "tracked"),
             "config": SQLiteStorage.get_run_config("dipo", "tracked")}
    print("FOUND " + json.dumps(found, default=str))
    """
)


def test_trackio_local_store_holds_one_run_with_every_step(tmp_path: Path) -> None:
    _installed("trackio")
    run_dir = _track("trackio", tmp_path)
    store = run_dir / "trackers/trackio"
    assert json.loads((run_dir / "trackers/runs.json").read_text())["trackio"]["dir"] == str(store.resolve())
    # trackio reads TRACKIO_DIR once at import: its reader runs in a process of its own, pointed at the store
    env = _env(tmp_path) | {"TRACKIO_DIR": str(store)}
    done = subprocess.run([sys.executable, "-c", READER], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("FOUND ")]
    found = json.loads(line.removeprefix("FOUND "))
    assert found["runs"] == ["tracked"]
    metric_rows = [row for row in found["logs"] if "loss" in row]
    assert [row["step"] for row in metric_rows] == [1, 2, 3, 3, 4]
    assert metric_rows[-1]["loss"] == pytest.approx(0.125) and "__step" not in metric_rows[-1]
    images = [row for row in found["logs"] if "report/reward" in row]
    assert images and images[-1]["step"] == 4 and images[-1]["report/reward"]["_type"] == "trackio.image"
    assert found["config"]["learner"]["trackers"] == ["trackio"] and found["config"]["redis"]["password"] == "***"
