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


def single_rank(script: ModuleType, loss: str, samples: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Parameters and metrics of the same step on one process, no process group."""
    torch.set_num_threads(1)
    model = script.build_model()
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    metrics = Trainer(script.build_cfg(loss), model, dist).train_step(script.build_samples(samples))
    return script.full_parameters(model), metrics


@pytest.mark.parametrize(
    ("loss", "fsdp", "samples"),
    [("dapo", False, 11), ("grpo", False, 11), ("dapo", True, 11), ("dapo", False, 1), ("dapo", True, 1)],
    ids=["replicated-dapo", "replicated-grpo", "fsdp-dapo", "replicated-idle-rank", "fsdp-idle-rank"],
)
def test_two_ranks_match_one_rank(tmp_path: Path, loss: str, fsdp: bool, samples: int) -> None:
    """FSDP2 runs on gloo here too; with one sample, rank 1 trains on nothing (zero gradients, or FSDP filler)."""
    script = load_script()
    metrics = run_torchrun(tmp_path, "--loss", loss, "--samples", str(samples), *(["--fsdp"] if fsdp else []))
    expected, expected_metrics = single_rank(script, loss, samples)
    got = load_file(str(tmp_path / "params.safetensors"))
    initial = script.full_parameters(script.build_model())
    assert set(got) == set(expected)
    assert max(float((expected[k] - initial[k]).abs().max()) for k in got) > 1e-4  # the step moved them
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) < 1e-9
    assert metrics["world_size"] == 2
    for key in ("loss", "grad_norm", "tokens", "sequences", "entropy", "ratio_mean", "is_weight_mean"):
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-9, abs=1e-12), key
