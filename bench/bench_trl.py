"""Side by side: TRL's GRPOTrainer and `dipo run` on the quick-start workload, alternated on one machine.

Run: make bench-trl, or .venv/bin/python bench/bench_trl.py [--steps 8] [--rounds 1] [--out bench/results/vs_trl.json]

Each round runs TRL (bench/trl_grpo.py in the TRL virtualenv, set up by scripts/setup_trl.sh when missing), then
`.venv/bin/dipo run configs/quickstart.yaml --set learner.steps=N ...` in a scratch run folder. Both sides get the
same local model folder and the same prompts: the project's own items (learner.data.load_items on the config's data
section, in the feeder's epoch-0 order) are exported once to a JSONL file that the TRL side reads.

Per run it measures the median wall seconds per optimizer step over steps 2..N (dipo: intervals between consecutive
metrics.jsonl lines; TRL: intervals between the ends of consecutive global steps), the generation/training split
(TRL: its generation-and-scoring call vs the rest of the step; dipo: the learner's train step `step_seconds` vs the
rest, i.e. waiting for scored groups, weight sync, gather, checkpoint), and the peak resident memory of the largest
process (sampled with psutil over the launched process and all its descendants; dipo: which child it was). The
summary ratio is dipo / TRL of the median seconds per step (< 1: dipo is faster). Only ratios measured in the same
run mean anything: the machine is not the same speed from day to day (shared/docs/PERFORMANCE.md).

This is a long benchmark (minutes per step on 2 CPU cores): `make bench` skips it, and no test runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
PROJECT_BIN = ROOT / ".venv" / "bin"
DEFAULT_OUT = ROOT / "bench" / "results" / "vs_trl.json"
DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"
SAMPLE_INTERVAL_S = 0.25
GIB = 1024**3

# Run in the project venv as a separate process (bench code never imports the project's tooling): make sure the
# model folder exists (converted on first use), export the quick-start items in feeder order, report versions.
EXPORT_SNIPPET = r"""
import json, sys
from importlib import metadata
from pathlib import Path
from services.config import load_config
from services.modeling.loading import resolve_model_path
from learner.data import EpochOrder, load_items

cfg = load_config(sys.argv[1])
cache = Path(cfg.model.cache_dir) if cfg.model.cache_dir else None
model = resolve_model_path(cfg.model.name_or_path, cache)
items = load_items(cfg.data)
order = EpochOrder(len(items), cfg.data.seed).order(0)
with open(sys.argv[2], "w", encoding="utf-8") as handle:
    for index in order:
        item = items[index]
        row = {"item_id": item.item_id, "messages": item.messages, "answer": item.ground_truth}
        handle.write(json.dumps(row) + "\n")
versions = {}
for name in ("dipo", "torch", "transformers", "reasoning_gym", "math-verify"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
print(json.dumps({"model_path": str(model), "model": cfg.model.name_or_path, "dtype": cfg.model.dtype,
                  "items": len(items), "data": cfg.data.model_dump(mode="json"),
                  "sampling": cfg.sampling.model_dump(mode="json"),
                  "prompts_per_step": cfg.learner.prompts_per_step, "versions": versions}))
"""


# ---- process-tree memory sampling -------------------------------------------------------------------------------


def _describe(proc: psutil.Process) -> tuple[str, str]:
    """A short role for a process (the module after the last `-m`, redis-server, ...) and its command line."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?", ""
    text = " ".join(cmd)
    modules = [cmd[i + 1] for i, arg in enumerate(cmd[:-1]) if arg == "-m"]
    if "redis-server" in name or (cmd and "redis-server" in Path(cmd[0]).name):
        role = "redis-server"
    elif "multiprocessing" in text:
        role = "multiprocessing worker"
    elif modules:
        role = modules[-1]
    elif len(cmd) >= 2 and cmd[1].endswith(".py"):
        role = Path(cmd[1]).name
    elif cmd:
        role = Path(cmd[0]).name
    else:
        role = name
    return role, text[:300]


class TreeRssSampler(threading.Thread):
    """Samples the RSS of a process and all its descendants until stopped; keeps each process's peak."""

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(name=f"rss-sampler-{pid}", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.peaks: dict[int, dict[str, Any]] = {}
        self.peak_total_bytes = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval_s)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return
        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            record = self.peaks.get(proc.pid)
            if record is None:
                role, cmdline = _describe(proc)
                try:
                    parent = proc.ppid()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    parent = None
                record = {"pid": proc.pid, "ppid": parent, "role": role, "cmdline": cmdline, "peak_rss_bytes": 0}
                if proc.pid == self.pid:
                    record["role"] = f"{role} (launched process)"
                self.peaks[proc.pid] = record
            record["peak_rss_bytes"] = max(record["peak_rss_bytes"], rss)
        self.peak_total_bytes = max(self.peak_total_bytes, total)
        self.samples += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)

    def largest(self) -> dict[str, Any] | None:
        return max(self.peaks.values(), key=lambda r: r["peak_rss_bytes"], default=None)


# ---- running one side -------------------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop_tree(proc: subprocess.Popen[bytes], grace_s: float = 90.0) -> None:
    """SIGTERM the process we started (dipo's launcher stops its own children), then SIGKILL what is left of it."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run_monitored(cmd: list[str], log_path: Path, timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` with stdout+stderr to `log_path`, sampling its process tree's RSS; raise on failure."""
    print(f"  $ {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        sampler = TreeRssSampler(proc.pid)
        sampler.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_tree(proc)
            raise RuntimeError(f"{cmd[0]} ran past {timeout_s:.0f} s; log {log_path}:\n{_tail(log_path)}") from None
        except BaseException:  # Ctrl-C: do not leave a training run behind
            _stop_tree(proc)
            raise
        finally:
            sampler.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {code}; log {log_path}:\n{_tail(log_path)}")
    largest = sampler.largest()
    return {
        "exit_code": code,
        "wall_seconds": wall,
        "log": str(log_path),
        "largest_process": largest,
        "peak_rss_bytes": largest["peak_rss_bytes"] if largest else None,
        "peak_total_rss_bytes": sampler.peak_total_bytes,
        "processes": sorted(sampler.peaks.values(), key=lambda r: -r["peak_rss_bytes"]),
        "rss_samples": sampler.samples,
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_trl(
    trl_python: Path, model_path: str, items: Path, steps: int, work: Path, tag: str, timeout_s: float
) -> dict[str, Any]:
    out = work / f"trl-{tag}.json"
    cmd = [
        str(trl_python),
        str(ROOT / "bench" / "trl_grpo.py"),
        "--model",
        model_path,
        "--data",
        str(items),
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--output-dir",
        str(work / f"trl-{tag}-trainer"),
    ]
    env = dict(os.environ)
    # Nothing can come from a model hub here: the model is a local folder and the data a local file.
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env |= {"HF_HOME": str(work / "hf-home"), "WANDB_DISABLED": "true"}
    env.pop("PYTHONPATH", None)
    proc = run_monitored(cmd, work / f"trl-{tag}.log", timeout_s, env)
    result = json.loads(out.read_text())
    summary = result["summary"]
    return {
        "side": "trl",
        "round": tag,
        "median_step_seconds": summary["median_step_seconds"],
        "median_generation_seconds": summary["median_generation_seconds"],
        "median_generate_only_seconds": summary["median_generate_only_seconds"],
        "median_training_seconds": summary["median_training_seconds"],
        "completions_per_second": summary["completions_per_second"],
        "median_over_steps": summary["median_over_steps"],
        "peak_rss_bytes": proc["peak_rss_bytes"],
        "peak_rss_process": proc["largest_process"]["role"] if proc["largest_process"] else None,
        "peak_total_rss_bytes": proc["peak_total_rss_bytes"],
        "ru_maxrss_bytes": summary["peak_rss_bytes"],
        "process_wall_seconds": proc["wall_seconds"],
        "torch_threads": result["torch_threads"],
        "versions": result["versions"],
        "workload": result["workload"],
        "startup_seconds": {k: summary[k] for k in ("import_seconds", "load_seconds", "trainer_init_seconds")},
        "steps": result["steps"],
        "processes": proc["processes"],
    }


def _dipo_steps(lines: list[dict[str, Any]], samples_per_prompt: int) -> list[dict[str, Any]]:
    steps = []
    previous: float | None = None
    for line in sorted(lines, key=lambda d: d["step"]):
        stamp = float(line.get("elapsed_s", line.get("time", 0.0)))
        wall = stamp - previous if previous is not None else float(line.get("elapsed_s", 0.0))
        previous = stamp
        # What the learner blocked on: the batch wait, the previous publication (a publication overlaps the next
        # batch wait, so its own duration `sync_seconds` is not part of the step), the gather, the checkpoint.
        parts = {k: float(line.get(k) or 0.0) for k in ("wait_seconds", "sync_wait_seconds", "gather_seconds")}
        parts["checkpoint_seconds"] = float(line.get("checkpoint_seconds") or 0.0)
        train = float(line.get("step_seconds") or 0.0)
        consumed = float(line.get("groups_consumed") or 0.0)
        steps.append(
            {
                "step": int(line["step"]),
                "wall_seconds": wall,
                "training_seconds": train,
                "non_training_seconds": wall - train,
                "forward_backward_seconds": float(line.get("forward_backward_seconds") or 0.0),
                "publication_seconds": float(line.get("sync_seconds") or 0.0),
                "proximal_seconds": float(line.get("proximal_seconds") or 0.0),
                **parts,
                "other_seconds": wall - train - sum(parts.values()),
                "groups_used": float(line.get("groups_used") or 0.0),
                "groups_consumed": consumed,
                "completions_generated": consumed * samples_per_prompt,
                "tokens": line.get("tokens"),
                "reward_mean": line.get("reward_mean"),
                "accuracy": line.get("accuracy"),
                "staleness_mean": line.get("staleness_mean"),
                "time": line.get("time"),
                "elapsed_s": line.get("elapsed_s"),
            }
        )
    return steps


def run_dipo(
    config: Path, steps: int, work: Path, tag: str, timeout_s: float, samples: int, keep: bool
) -> dict[str, Any]:
    dipo = PROJECT_BIN / "dipo"
    run_dir = work / f"dipo-{tag}"
    cmd = [
        str(dipo),
        "run",
        str(config),
        "--set",
        f"learner.steps={steps}",
        "--set",
        f"name=bench-trl-{tag}",
        "--set",
        f"run_dir={run_dir}",
    ]
    env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
    proc = run_monitored(cmd, work / f"dipo-{tag}.log", timeout_s, env)
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    if len(lines) < steps:
        raise RuntimeError(f"dipo wrote {len(lines)} of {steps} steps to {metrics}; log {work / f'dipo-{tag}.log'}")
    if not keep:  # about 1.6 GB per run: the benchmark needs only the metrics and logs
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    per_step = _dipo_steps(lines, samples)
    later = [s for s in per_step if s["step"] >= 2] or per_step
    # The largest of the launcher's children (the launcher itself only supervises).
    children = [p for p in proc["processes"] if "(launched process)" not in p["role"]]
    largest = max(children, key=lambda r: r["peak_rss_bytes"], default=proc["largest_process"])
    median_wall = _median([s["wall_seconds"] for s in later])
    return {
        "side": "dipo",
        "round": tag,
        "median_step_seconds": median_wall,
        "median_training_seconds": _median([s["training_seconds"] for s in later]),
        "median_non_training_seconds": _median([s["non_training_seconds"] for s in later]),
        "median_wait_seconds": _median([s["wait_seconds"] for s in later]),
        "median_sync_wait_seconds": _median([s["sync_wait_seconds"] for s in later]),
        "median_publication_seconds": _median([s["publication_seconds"] for s in later]),
        "median_forward_backward_seconds": _median([s["forward_backward_seconds"] for s in later]),
        "median_proximal_seconds": _median([s["proximal_seconds"] for s in later]),
        "completions_per_second": (
            sum(s["completions_generated"] for s in later) / sum(s["wall_seconds"] for s in later) if later else None
        ),
        "median_over_steps": [s["step"] for s in later],
        "peak_rss_bytes": largest["peak_rss_bytes"] if largest else None,
        "peak_rss_process": largest["role"] if largest else None,
        "peak_rss_pid": largest["pid"] if largest else None,
        "peak_total_rss_bytes": proc["peak_total_rss_bytes"],
        "process_wall_seconds": proc["wall_seconds"],
        "run_dir": str(run_dir),
        "steps": per_step,
        "processes": proc["processes"],
    }


# ---- set-up, machine, report ------------------------------------------------------------------------------------


def ensure_trl_venv(venv: Path) -> Path:
    """Run scripts/setup_trl.sh (idempotent: fast when the venv is complete) and return the venv's python."""
    python = venv / "bin" / "python"
    subprocess.run(["bash", str(ROOT / "scripts" / "setup_trl.sh"), str(venv)], cwd=ROOT, check=True)
    if not python.exists():
        raise SystemExit(f"scripts/setup_trl.sh did not create {python}")
    return python


def export_items(config: Path, items_path: Path) -> dict[str, Any]:
    """Resolve the model folder and write the config's items (feeder order) with the project's own code."""
    python = PROJECT_BIN / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make setup` first")
    done = subprocess.run(
        [str(python), "-c", EXPORT_SNIPPET, str(config), str(items_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def _gib(value: float | None) -> str:
    return f"{value / GIB:.2f}" if value else "-"


def _secs(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def print_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    header = f"{'run':<10} {'s/step':>8} {'gen/wait':>9} {'train':>8} {'compl/s':>8} {'peak GiB':>9}  process"
    print("\n" + header)
    print("-" * len(header))
    for run in runs:
        split = run.get("median_generation_seconds", run.get("median_non_training_seconds"))
        rate = run.get("completions_per_second")
        print(
            f"{run['side'] + '-' + str(run['round']):<10} {_secs(run['median_step_seconds']):>8} {_secs(split):>9} "
            f"{_secs(run['median_training_seconds']):>8} {(f'{rate:.2f}' if rate else '-'):>8} "
            f"{_gib(run['peak_rss_bytes']):>9}  {run.get('peak_rss_process') or '-'}"
        )
    ratio = summary.get("ratio_seconds_per_step")
    print(
        f"\ndipo / TRL seconds per step: {ratio:.3f}" if ratio is not None else "\ndipo / TRL: -",
        f"(TRL {_secs(summary['trl_median_step_seconds'])} s, dipo {_secs(summary['dipo_median_step_seconds'])} s;"
        f" medians over steps {summary['median_over_steps']}, {summary['rounds']} round(s))",
    )
    print("TRL gen/wait = generation + scoring; dipo gen/wait = learner time outside its train step.")


def summarise(runs: list[dict[str, Any]], steps: int, rounds: int) -> dict[str, Any]:
    def side(name: str, key: str) -> float | None:
        return _median([r[key] for r in runs if r["side"] == name and r.get(key) is not None])

    trl_s, dipo_s = side("trl", "median_step_seconds"), side("dipo", "median_step_seconds")
    trl_mem, dipo_mem = side("trl", "peak_rss_bytes"), side("dipo", "peak_rss_bytes")
    per_round = []
    for tag in sorted({r["round"] for r in runs}):
        pair = {r["side"]: r for r in runs if r["round"] == tag}
        if "trl" in pair and "dipo" in pair and pair["trl"]["median_step_seconds"]:
            per_round.append(pair["dipo"]["median_step_seconds"] / pair["trl"]["median_step_seconds"])
    return {
        "steps": steps,
        "rounds": rounds,
        "median_over_steps": list(range(2, steps + 1)) if steps >= 2 else [1],
        "trl_median_step_seconds": trl_s,
        "dipo_median_step_seconds": dipo_s,
        "ratio_seconds_per_step": dipo_s / trl_s if trl_s and dipo_s else None,
        "ratio_per_round": per_round,
        "trl_median_generation_seconds": side("trl", "median_generation_seconds"),
        "trl_median_training_seconds": side("trl", "median_training_seconds"),
        "dipo_median_training_seconds": side("dipo", "median_training_seconds"),
        "dipo_median_non_training_seconds": side("dipo", "median_non_training_seconds"),
        "trl_peak_rss_bytes": trl_mem,
        "dipo_peak_rss_bytes": dipo_mem,
        "ratio_peak_rss": dipo_mem / trl_mem if trl_mem and dipo_mem else None,
        "trl_completions_per_second": side("trl", "completions_per_second"),
        "dipo_completions_per_second": side("dipo", "completions_per_second"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (medians over steps 2..N)")
    parser.add_argument("--rounds", type=int, default=1, help="TRL, dipo pairs, run alternately")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON file")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="dipo run config (the workload)")
    parser.add_argument("--trl-venv", type=Path, default=ROOT / ".venv-trl", help="TRL virtualenv (set up if missing)")
    parser.add_argument("--run-timeout", type=float, default=0.0, help="seconds per run (0: 900 + 300 x steps)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, dipo run folders)")
    parser.add_argument("--note", default="", help="free text stored in the result (e.g. what else ran)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    timeout_s = args.run_timeout or 900.0 + 300.0 * args.steps
    config = args.config.resolve()

    started = time.perf_counter()
    measured_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    host = machine()
    trl_python = ensure_trl_venv(args.trl_venv)
    work = Path(tempfile.mkdtemp(prefix="dipo-bench-trl-"))
    print(f"bench-trl: scratch folder {work}", flush=True)
    ok = False
    try:
        items_path = work / "items.jsonl"
        exported = export_items(config, items_path)
        print(f"bench-trl: {exported['items']} items, model {exported['model_path']}", flush=True)
        runs: list[dict[str, Any]] = []
        samples = int(exported["sampling"]["n"])
        for index in range(1, args.rounds + 1):
            print(f"== round {index}/{args.rounds}: TRL", flush=True)
            runs.append(
                run_trl(trl_python, exported["model_path"], items_path, args.steps, work, str(index), timeout_s)
            )
            print(f"== round {index}/{args.rounds}: dipo", flush=True)
            runs.append(run_dipo(config, args.steps, work, str(index), timeout_s, samples, args.keep))
        summary = summarise(runs, args.steps, args.rounds)
        trl_versions: dict[str, Any] = next((r["versions"] for r in runs if r["side"] == "trl"), {})
        result = {
            "name": "vs_trl",
            "measured_at": measured_at,
            "note": args.note,
            "machine": host | {"loadavg_at_end": list(os.getloadavg())},
            "versions": {"dipo_venv": exported["versions"], "trl_venv": trl_versions},
            "workload": {
                "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
                "model": exported["model"],
                "dtype": exported["dtype"],
                "data": exported["data"],
                "sampling": exported["sampling"],
                "prompts_per_step": exported["prompts_per_step"],
                "steps": args.steps,
                "rounds": args.rounds,
                "order": "TRL then dipo, alternately",
            },
            "summary": summary,
            "runs": runs,
            "total_seconds": time.perf_counter() - started,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print_table(runs, summary)
        print(f"bench-trl: wrote {args.out} in {result['total_seconds'] / 60:.1f} min", flush=True)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"bench-trl: logs and run folders kept in {work}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
