"""Two gloo ranks under torchrun reach the parameters that one rank reaches on the same batch."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from learner.distributed import DistInfo
from learner.train import Trainer

SCRIPT = Path(__file__).with_name("_dist_step.py")

pytestmark = pytest.mark.timeout(120)


def load_script() -> ModuleType:
    """Import _dist_step.py by path, for its model, batch and config builders."""
    spec = importlib.util.spec_from_file_location("_dist_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free right now on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_torchrun(out: Path, *extra: str) -> dict[str, float]:
    """Run the step script on 2 gloo ranks; return rank 0's metrics."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), str(SCRIPT), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def single_rank(
    script: ModuleType, loss: str, samples: int, updates: tuple[int, ...], tied: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Parameters and metrics of the same step on one process, no process group."""
    torch.set_num_threads(1)
    model = script.build_model(tied)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    metrics = Trainer(script.build_cfg(loss, *updates), model, dist).train_step(script.build_samples(samples))
    return script.full_parameters(model), metrics


@pytest.mark.parametrize(
    ("loss", "fsdp", "samples", "updates"),
    [
        ("dapo", False, 11, (1, 1)),
        ("grpo", False, 11, (1, 1)),
        ("dapo", True, 11, (1, 1)),
        ("dapo", False, 1, (1, 1)),
        ("dapo", True, 1, (1, 1)),
        ("dapo", False, 11, (2, 2)),
        ("dapo", True, 11, (2, 2, True)),
    ],
    ids=[
        "replicated-dapo",
        "replicated-grpo",
        "fsdp-dapo",
        "replicated-idle-rank",
        "fsdp-idle-rank",
        "replicated-minibatches",
        "fsdp-minibatches-checkpointing",
    ],
)
def test_two_ranks_match_one_rank(
    tmp_path: Path, loss: str, fsdp: bool, samples: int, updates: tuple[int, ...]
) -> None:
    """FSDP2 runs on gloo here too; with one sample, rank 1 trains on nothing (zero gradients, or FSDP filler);
    with 2 mini-batches x 2 epochs both ranks make the same 4 updates, the last three with a moving ratio (under
    FSDP with gradient checkpointing: `updates` is (mini-batches, epochs[, checkpointing]))."""
    script = load_script()
    extra = ["--minibatches", str(updates[0]), "--epochs", str(updates[1]), *(["--fsdp"] if fsdp else [])]
    extra += ["--gradient-checkpointing"] if updates[2:] == (True,) else []
    metrics = run_torchrun(tmp_path, "--loss", loss, "--samples", str(samples), *extra)
    expected, expected_metrics = single_rank(script, loss, samples, updates)
    got = load_file(str(tmp_path / "params.safetensors"))
    initial = script.full_parameters(script.build_model())
    assert set(got) == set(expected)
    assert max(float((expected[k] - initial[k]).abs().max()) for k in got) > 1e-4  # the step moved them
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) < 1e-9
    assert metrics["world_size"] == 2
    assert metrics["updates"] == updates[0] * updates[1]
    keys = ("loss", "grad_norm", "tokens", "sequences", "entropy", "ratio_mean", "ratio_max", "is_weight_mean")
    for key in (*keys, "clip_low", "clip_high", "updates"):
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-9, abs=1e-12), key


def test_fsdp_with_an_untied_output_layer_matches_one_rank(tmp_path: Path) -> None:
    """The output layer then sits in the root unit (the chunked head multiplies by its weight directly)."""
    script = load_script()
    metrics = run_torchrun(tmp_path, "--samples", "11", "--fsdp", "--untied")
    expected, expected_metrics = single_rank(script, "dapo", 11, (1, 1), tied=False)
    got = load_file(str(tmp_path / "params.safetensors"))
    assert "lm_head.weight" in got and set(got) == set(expected)
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) < 1e-9
    assert metrics["loss"] == pytest.approx(expected_metrics["loss"], rel=1e-9)
