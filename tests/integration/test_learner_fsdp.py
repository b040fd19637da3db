"""The learner under FSDP2 (2 gloo ranks): the weights it publishes and checkpoints are the full ones, and a sharded
resume continues exactly where a single unsharded rank would be."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from model_factories import save_tiny_llama
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from learner.checkpoint import OPTIMIZER_DIR, OPTIMIZER_FILE, STATE_FILE, checkpoint_dir_name, load_model_weights
from learner.checkpoint_dcp import load_sharded_optimizer_state
from learner.distributed import DistInfo
from learner.loop import Learner
from learner.train import Trainer

SCRIPT = Path(__file__).with_name("_fsdp_loop.py")
TOLERANCE = 1e-6
RELATIVE_TOLERANCE = 1e-5

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random tied-embedding Llama with the SmolLM2 tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny_llama(folder, hidden_size=32, intermediate_size=64, heads=4, kv_heads=2, max_positions=256)


def build_cfg(model: Path, run_dir: Path) -> Any:
    """The script's run config (imported by path: tests/integration is not a package)."""
    spec = importlib.util.spec_from_file_location("_fsdp_loop", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_cfg(model, run_dir)


def free_port() -> int:
    """A TCP port free right now on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_script(model: Path, run_dir: Path, out: Path, *extra: str, ranks: int) -> subprocess.Popen[str]:
    """Start the script: under torchrun with `ranks` gloo ranks, or as one plain process when ranks == 1."""
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port())]
    cmd += [str(SCRIPT), "--model", str(model), "--run-dir", str(run_dir), "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str]) -> None:
    """Wait for a script run and fail with its output if it failed."""
    output, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, output[-4000:]


def checkpoint(run_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Weights, optimizer state and trainer state of checkpoint `step` of a run.

    A 1-rank run writes the optimizer state whole (optimizer.pt); several FSDP ranks write it sharded
    (optimizer/rank-NNNNN), which is read back here as one unsharded process would resume it.
    """
    folder = run_dir / "checkpoints" / checkpoint_dir_name(step)
    if (folder / OPTIMIZER_FILE).is_file():
        optimizer = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    else:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        trainer = Trainer(build_cfg(folder, run_dir), model, single)
        load_sharded_optimizer_state(model, trainer.optimizer, folder / OPTIMIZER_DIR)
        optimizer = trainer.optimizer.state_dict()
    return load_model_weights(folder), optimizer, json.loads((folder / STATE_FILE).read_text())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute elementwise difference over tensors of the same names."""
    assert set(a) == set(b)
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def moments(optimizer_state: dict, key: str) -> dict[str, torch.Tensor]:
    """One AdamW moment of every parameter, keyed by parameter id."""
    return {str(i): s[key] for i, s in optimizer_state["state"].items()}


def assert_same_optimizer(got: dict, expected: dict) -> None:
    """Same hyper-parameters (lr included), step counts and moments: the moments are tiny here (1e-5 and 1e-11),
    so each is compared relative to its largest entry, which is stricter than 1e-6 absolute."""
    assert got["param_groups"] == expected["param_groups"]
    assert set(got["state"]) == set(expected["state"])
    for i in got["state"]:
        assert float(got["state"][i]["step"]) == float(expected["state"][i]["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        reference = moments(expected, key)
        scale = max(float(v.abs().max()) for v in reference.values())
        assert scale > 0.0, key
        assert max_diff(moments(got, key), reference) < min(TOLERANCE, RELATIVE_TOLERANCE * scale), key


def test_fsdp_learner_publishes_checkpoints_and_resumes_like_one_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    """(a) the step-1 checkpoint of 2 FSDP ranks is the 1-rank one; (b) resuming it on 2 fresh FSDP ranks and
    training step 2 matches 2 steps on 1 rank; (c) published names are the unwrapped model's own."""
    reference = run_script(tiny_model_dir, tmp_path / "ref", tmp_path / "ref-out", "--steps", "2", ranks=1)
    sharded = tmp_path / "fsdp"
    first = run_script(tiny_model_dir, sharded, tmp_path / "out1", "--steps", "1", ranks=2)
    finish(first)
    second = run_script(tiny_model_dir, sharded, tmp_path / "out2", "--steps", "1", "--resume", ranks=2)
    finish(reference)
    finish(second)
    assert json.loads((tmp_path / "ref-out" / "info.json").read_text()) == {"world_size": 1, "fsdp": False}
    assert json.loads((tmp_path / "out1" / "info.json").read_text()) == {"world_size": 2, "fsdp": True}

    initial = load_model_weights(tiny_model_dir)
    for step in (1, 2):
        ref_weights, ref_optimizer, ref_state = checkpoint(tmp_path / "ref", step)
        weights, optimizer, state = checkpoint(sharded, step)
        assert state == ref_state == {"step": step, "version": step}
        assert max_diff(ref_weights, initial) > 1e-4  # the steps moved the weights: the comparison can fail
        assert max_diff(weights, ref_weights) < TOLERANCE, f"step {step}"
        assert_same_optimizer(optimizer, ref_optimizer)

    expected_names = [name for name, _ in LlamaForCausalLM.from_pretrained(tiny_model_dir).named_parameters()]
    assert "model.embed_tokens.weight" in expected_names
    for out, step in (("out1", 1), ("out2", 2)):
        names = json.loads((tmp_path / out / "names.json").read_text())
        assert names["per_step"] == [expected_names]
        assert names["published"] == expected_names
        published = load_file(str(tmp_path / out / "published.safetensors"))
        assert max_diff(published, checkpoint(sharded, step)[0]) == 0.0

    # The unsharded resume path (weights before the Trainer, then optimizer, schedule, RNG) restores step 2 exactly.
    torch.set_num_threads(1)
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    resumed = Learner(build_cfg(tiny_model_dir, tmp_path / "ref"), single, resume=True)
    weights, optimizer, _ = checkpoint(tmp_path / "ref", 2)
    assert (resumed.step, resumed.version, resumed.fsdp) == (2, 2, False)
    assert max_diff(dict(resumed.model.named_parameters()), weights) == 0.0
    assert_same_optimizer(resumed.trainer.optimizer.state_dict(), optimizer)
    assert resumed.trainer.scheduler.last_epoch == 2
