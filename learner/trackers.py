"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and trackio, behind one small interface.

``learner.trackers`` names the trackers of a run (empty: nothing is tracked, and nothing here imports a tracker
package). Each one gets every ``metrics.jsonl`` line (all numeric keys, at the line's step), the resolved config with
its secrets masked (``services.config.dump_config``), and the run report's plots (``log_artifacts``). Their local
stores live under ``learner.tracker_dir`` (default ``<run_dir>/trackers``): ``tensorboard/`` (event files),
``wandb/`` (``WANDB_MODE=offline`` runs, for ``wandb sync``), ``mlflow/`` (a file store, unless
``MLFLOW_TRACKING_URI`` names a server or database) and ``trackio/`` (its SQLite database, unless ``TRACKIO_DIR`` is
set). A restarted learner continues the same tracker runs: their ids are kept in ``<tracker_dir>/runs.json``.

A tracker whose package is missing stops the learner at start with the extra to install. A tracker that fails
while logging is a fault this module tolerates: training matters more than its charts. The failure is logged and
counted in ``Trackers.failures``; a tracker that fails ``MAX_CONSECUTIVE_FAILURES`` times in a row is switched off.

``python -m learner.trackers --config RUN.yaml --artifacts RUN_DIR/report`` logs a folder from another process
(the launcher, once it has built the report), to the same tracker runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, get_args

import yaml

from services.config import RunConfig, TrackerName, dump_config, load_config

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 10
"""A tracker that fails this many calls in a row is switched off for the rest of the process."""
RUNS_FILE = "runs.json"
"""Under the tracker folder: the id of each tracker's run, so that a restarted learner continues it."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STATUSES = ("done", "stopped", "failed")
"""The learner's final status (the policy hash's), which ``close`` passes on where a tracker records one."""


class TrackerUnavailable(RuntimeError):
    """A configured tracker's package is not installed."""


def _missing(tracker: str, package: str, exc: ImportError) -> TrackerUnavailable:
    return TrackerUnavailable(
        f"learner.trackers names {tracker!r}, but {package} cannot be imported ({exc}): install it with "
        f"pip install 'dipo[{tracker}]' (or 'dipo[tracking]' for every tracker), or remove it from learner.trackers"
    )


@dataclass
class RunInfo:
    """What every tracker is told about the run."""

    name: str
    project: str
    store: Path
    """This tracker's own folder under the tracker folder."""
    config_yaml: str
    """The resolved config, secrets masked."""
    state: dict[str, Any]
    """This tracker's entry of runs.json (its run id); a tracker writes what it needs to continue the run."""

    @property
    def config(self) -> dict[str, Any]:
        """The masked config as a nested mapping."""
        loaded = yaml.safe_load(self.config_yaml)
        return loaded if isinstance(loaded, dict) else {}


class Tracker(Protocol):
    """One experiment tracker."""

    def log_step(self, values: dict[str, float], step: int) -> None:
        """Log one step's numeric values."""

    def log_images(self, images: list[Path], step: int) -> None:
        """Log PNG/JPEG plots, each under ``report/<file stem>``, at `step`."""

    def log_files(self, folder: Path) -> None:
        """Keep a copy of a folder's files with the run, where the tracker stores files."""

    def close(self, status: str) -> None:
        """Flush and end the run (`status`: done, stopped or failed)."""


# ---------------------------------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Event files under ``<store>``, one per learner start (TensorBoard merges them)."""

    def __init__(self, run: RunInfo) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard", "tensorboard", exc) from exc
        self.writer = SummaryWriter(log_dir=str(run.store), flush_secs=30)
        # Markdown: indented by four spaces, the YAML renders as a code block in the Text tab.
        self.writer.add_text("config", "\n".join(f"    {line}" for line in run.config_yaml.splitlines()), 0)

    def log_step(self, values: dict[str, float], step: int) -> None:
        """One scalar per key."""
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, images: list[Path], step: int) -> None:
        """Each plot as an image (decoded with Pillow, which matplotlib brings)."""
        import numpy as np
        from PIL import Image

        for path in images:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"report/{path.stem}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def log_files(self, folder: Path) -> None:
        """TensorBoard keeps no files."""

    def close(self, status: str) -> None:
        """Flush the event file."""
        self.writer.close()


# ---------------------------------------------------------------------------------------------------- W&B


class WandbTracker:
    """A W&B run (``WANDB_MODE=offline``: a folder under ``<store>/wandb`` that ``wandb sync`` uploads later)."""

    def __init__(self, run: RunInfo) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", "wandb", exc) from exc
        self.wandb = wandb
        run.store.mkdir(parents=True, exist_ok=True)
        run_id = run.state.setdefault("id", uuid.uuid4().hex[:16])
        # No system metadata: W&B would record the process's command line, and `--set` overrides may hold secrets.
        settings = wandb.Settings(console="off", save_code=False, x_disable_meta=True)
        self.run = wandb.init(project=run.project, name=run.name, id=run_id, dir=str(run.store), resume="allow",
                              settings=settings)  # fmt: skip
        # Steps are the learner's: after a crash the resumed learner redoes steps past its checkpoint, which W&B's own
        # step counter (strictly increasing) would drop; with `step` as the x-axis both attempts are kept.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        # A resumed run may come with an edited config: the newest one wins.
        self.run.config.update(run.config, allow_val_change=True)

    def log_step(self, values: dict[str, float], step: int) -> None:
        """One history row, keyed by the learner's step."""
        self.run.log({**values, "step": step})

    def log_images(self, images: list[Path], step: int) -> None:
        """The plots as W&B images."""
        self.run.log({"step": step, **{f"report/{p.stem}": self.wandb.Image(str(p)) for p in images}})

    def log_files(self, folder: Path) -> None:
        """The folder's files among the run's files."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.run.save(str(path), base_path=str(folder), policy="now")

    def close(self, status: str) -> None:
        """Finish the run; a failed learner marks it failed."""
        self.run.finish(exit_code=1 if status == "failed" else 0)


# ---------------------------------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """An MLflow run in experiment `project`: a file store under ``<store>`` unless MLFLOW_TRACKING_URI is set."""

    STATUS = {"done": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, run: RunInfo) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or run.store.resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked: this one is ours.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", "mlflow (mlflow-skinny)", exc) from exc
        self.metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        run_id = self._continue_run(run.state.get("run_id"))
        if run_id is None:
            created = self.client.create_run(experiment_id, run_name=run.name, tags={"dipo.run": run.name})
            run_id = run.state["run_id"] = created.info.run_id
            self._log_params(run_id, run.config)
        self.run_id: str = run_id
        run.state["tracking_uri"] = uri
        self.client.log_text(self.run_id, run.config_yaml, "config.yaml")

    def _continue_run(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # the store was moved or emptied: start a new run rather than fail the learner
            log.warning("MLflow run %s of this run folder is gone: starting a new one", run_id)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        """The flattened config as parameters (once: MLflow forbids changing a parameter's value)."""
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in _flatten(config)]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters at a time
            self.client.log_batch(run_id, params=params[start : start + 100])

    def log_step(self, values: dict[str, float], step: int) -> None:
        """One metric value per key, at `step`."""
        now = int(time.time() * 1000)
        metrics = [self.metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # log_batch's limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_images(self, images: list[Path], step: int) -> None:
        """The plots are artifacts (``log_files``) in MLflow."""

    def log_files(self, folder: Path) -> None:
        """The folder as artifacts under ``<folder name>/``."""
        self.client.log_artifacts(self.run_id, str(folder), folder.name)

    def close(self, status: str) -> None:
        """End the run with MLflow's status for the learner's."""
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FINISHED"))


# ---------------------------------------------------------------------------------------------------- trackio


class TrackioTracker:
    """A trackio run in project `project`, in the SQLite store under ``<store>`` unless TRACKIO_DIR is set."""

    def __init__(self, run: RunInfo) -> None:
        # trackio reads TRACKIO_DIR once, when it is first imported
        if "trackio" not in sys.modules:
            os.environ.setdefault("TRACKIO_DIR", str(run.store.resolve()))
        try:
            import trackio
        except ImportError as exc:
            raise _missing("trackio", "trackio", exc) from exc
        self.trackio = trackio
        run.state["dir"] = str(trackio.utils.TRACKIO_DIR)
        self.run = trackio.init(
            project=run.project, name=run.name, config=run.config, resume="allow", embed=False,
            auto_log_gpu=False, auto_log_cpu=False,
        )  # fmt: skip

    def log_step(self, values: dict[str, float], step: int) -> None:
        """One row at `step` (trackio reserves the key `step` for that)."""
        self.run.log({k: v for k, v in values.items() if k != "step"}, step=step)

    def log_images(self, images: list[Path], step: int) -> None:
        """The plots as trackio images."""
        self.run.log({f"report/{p.stem}": self.trackio.Image(str(p)) for p in images}, step=step)

    def log_files(self, folder: Path) -> None:
        """trackio keeps the images (``log_images``), not other files."""

    def close(self, status: str) -> None:
        """Flush and finish the run."""
        self.run.finish()


TRACKERS: dict[str, Callable[[RunInfo], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}
"""Tracker name -> implementation; the names are ``services.config.TrackerName``."""
assert set(TRACKERS) == set(get_args(TrackerName)), "every TrackerName has an implementation"


# ---------------------------------------------------------------------------------------------------- the set


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def numeric_values(line: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl line (nulls, NaNs and non-numbers are left out), as floats."""
    values: dict[str, float] = {}
    for key, value in line.items():
        if isinstance(value, bool):
            values[key] = float(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            values[key] = float(value)
    return values


@dataclass
class Trackers:
    """The run's trackers; with none configured every call does nothing."""

    trackers: dict[str, Tracker] = field(default_factory=dict)
    folder: Path | None = None
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    """Calls that failed, per tracker (a fault tolerated: see the module docstring)."""
    last_step: int = 0
    _in_a_row: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: RunConfig, run_dir: Path) -> Trackers:
        """Open every tracker of ``cfg.learner.trackers`` (continuing the runs a previous start left); raises
        TrackerUnavailable, naming the extra to install, when a tracker's package is missing."""
        if not cfg.learner.trackers:
            return cls()
        folder = Path(cfg.learner.tracker_dir) if cfg.learner.tracker_dir else Path(run_dir) / "trackers"
        folder.mkdir(parents=True, exist_ok=True)
        runs_file = folder / RUNS_FILE
        runs: dict[str, dict[str, Any]] = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
        config_yaml = dump_config(cfg)
        opened: dict[str, Tracker] = {}
        try:
            for name in cfg.learner.trackers:
                info = RunInfo(cfg.name, cfg.learner.tracker_project, folder / name, config_yaml,
                               runs.setdefault(name, {}))  # fmt: skip
                opened[name] = TRACKERS[name](info)
                log.info("tracking to %s (%s)", name, info.store)
        except BaseException:
            for tracker in opened.values():
                tracker.close("failed")
            raise
        trackers = cls(opened, folder, runs)
        trackers._save_runs()
        return trackers

    def _save_runs(self) -> None:
        if self.folder is None:
            return
        tmp = self.folder / f".{RUNS_FILE}.tmp"
        tmp.write_text(json.dumps(self.runs, indent=2, sort_keys=True))
        tmp.replace(self.folder / RUNS_FILE)

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        """Run `call` on every tracker, tolerating (logging, counting) a tracker's failure."""
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception:
                self.failures[name] = self.failures.get(name, 0) + 1
                self._in_a_row[name] = self._in_a_row.get(name, 0) + 1
                log.warning("tracker %s failed to %s (%d failures)", name, what, self.failures[name], exc_info=True)
                if self._in_a_row[name] >= MAX_CONSECUTIVE_FAILURES:
                    log.error("tracker %s failed %d times in a row: switched off", name, self._in_a_row[name])
                    del self.trackers[name]
            else:
                self._in_a_row[name] = 0

    def log_step(self, line: Mapping[str, Any], step: int) -> None:
        """Log one metrics.jsonl line (every numeric key) at `step`."""
        if not self.trackers:
            return
        self.last_step = max(self.last_step, step)
        values = numeric_values(line)
        self._each("log a step", lambda tracker: tracker.log_step(values, step))

    def log_artifacts(self, folder: Path, step: int | None = None) -> None:
        """Log a folder (the run report): its PNG/JPEG plots as images at `step` (default: the last step logged
        here, else the run's newest metrics.jsonl step), and its files where the tracker keeps files."""
        folder = Path(folder)
        if not self.trackers or not folder.is_dir():
            return
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        at = step if step is not None else self.last_step
        if images:
            self._each("log images", lambda tracker: tracker.log_images(images, at))
        self._each("log files", lambda tracker: tracker.log_files(folder))

    def close(self, status: str = "done") -> None:
        """End every tracker's run (`status`: done, stopped or failed) and keep their ids for the next start."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._each("close", lambda tracker: tracker.close(status))
        self.trackers = {}
        self._save_runs()


def _last_step(run_dir: Path) -> int:
    """The newest step in a run folder's metrics.jsonl (0 without one)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return int(max(steps, default=0))


def main(argv: list[str] | None = None) -> int:
    """``python -m learner.trackers --config RUN.yaml [--set k=v] --artifacts FOLDER``: log a folder to the run's
    trackers (the launcher calls this once it has built the report)."""
    parser = argparse.ArgumentParser(prog="python -m learner.trackers", description=main.__doc__)
    parser.add_argument("--config", help="YAML run config (defaults < file < DIPO_* env < --set).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", required=True, type=Path, help="Folder to log (e.g. <run_dir>/report).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    run_dir = cfg.resolved_run_dir
    try:
        trackers = Trackers.from_config(cfg, run_dir)
    except TrackerUnavailable as exc:
        log.error("%s", exc)
        return 2
    trackers.log_artifacts(args.artifacts, _last_step(run_dir))
    trackers.close("done")
    return 1 if trackers.failures else 0


if __name__ == "__main__":
    sys.exit(main())
