"""Checkpoints of several FSDP ranks written sharded with torch.distributed.checkpoint (2 gloo ranks, tiny Llama):
each rank writes its own optimizer shard, the Hugging Face weights are still exported whole, and the checkpoint
resumes on 2 sharded ranks and on 1 unsharded process exactly where an unsharded run stands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _checkpoint_sharded import tiny_model

from learner.checkpoint import (
    OPTIMIZER_DIR,
    OPTIMIZER_FILE,
    STATE_FILE,
    checkpoint_dir_name,
    load_checkpoint,
    load_model_weights,
)

SCRIPT = Path(__file__).with_name("_checkpoint_sharded.py")
TOLERANCE = 1e-6

pytestmark = pytest.mark.timeout(300)


def run(root: Path, first: int, last: int, *, ranks: int, resume: bool = False) -> None:
    """The script for steps first..last: under torchrun with `ranks` gloo ranks, or as one plain process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), *sys.path])}
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd += [str(SCRIPT), "--root", str(root), "--first", str(first), "--last", str(last)]
    done = subprocess.run([*cmd, *(["--resume"] if resume else [])], env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute elementwise difference over tensors of the same names."""
    assert set(a) == set(b)
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def restored(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A checkpoint loaded into one unsharded process, as ``learner.verify`` and a 1-rank resume load it."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=3)
    load_checkpoint(folder, model, optimizer, scheduler)
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The unsharded reference (steps 1-3), and 2 FSDP ranks: step 1, then steps 2-3 resumed on 2 fresh ranks."""
    base = tmp_path_factory.mktemp("sharded")
    roots = {"reference": base / "reference", "sharded": base / "sharded"}
    run(roots["reference"], 1, 3, ranks=1)
    run(roots["sharded"], 1, 1, ranks=2)
    run(roots["sharded"], 2, 3, ranks=2, resume=True)
    return roots


def test_every_rank_writes_its_own_optimizer_shard_and_rank_0_the_rest(runs: dict[str, Path]) -> None:
    for step in (1, 2, 3):
        folder = runs["sharded"] / checkpoint_dir_name(step)
        shards = folder / OPTIMIZER_DIR
        assert sorted(p.name for p in shards.iterdir()) == ["rank-00000", "rank-00001"]
        assert all((p / ".metadata").is_file() and list(p.glob("*.distcp")) for p in shards.iterdir())
        assert not (folder / OPTIMIZER_FILE).exists(), "no full optimizer state was gathered"
        assert json.loads((folder / STATE_FILE).read_text()) == {"step": step, "version": step}
        assert (folder / "config.json").is_file() and (folder / "scheduler.pt").is_file()
    reference = runs["reference"] / checkpoint_dir_name(3)
    assert (reference / OPTIMIZER_FILE).is_file() and not (reference / OPTIMIZER_DIR).exists()


def test_the_exported_weights_are_the_full_ones_and_match_the_unsharded_run(runs: dict[str, Path]) -> None:
    initial = dict(tiny_model().state_dict())
    for step in (1, 2, 3):
        reference = load_model_weights(runs["reference"] / checkpoint_dir_name(step))
        sharded = load_model_weights(runs["sharded"] / checkpoint_dir_name(step))
        assert max_diff({k: initial[k] for k in reference}, reference) > 1e-4, "training moved the weights"
        assert max_diff(sharded, reference) < TOLERANCE, f"step {step}"


def test_a_sharded_checkpoint_resumes_in_one_unsharded_process_exactly(runs: dict[str, Path]) -> None:
    """The 2-rank, resumed step-3 checkpoint read by one process holds the reference's optimizer and schedule."""
    torch.set_num_threads(1)
    model, optimizer, scheduler = restored(runs["sharded"] / checkpoint_dir_name(3))
    ref_model, ref_optimizer, ref_scheduler = restored(runs["reference"] / checkpoint_dir_name(3))
    assert max_diff(dict(model.named_parameters()), dict(ref_model.named_parameters())) < TOLERANCE
    got, expected = optimizer.state_dict(), ref_optimizer.state_dict()
    assert got["param_groups"] == expected["param_groups"] and got["param_groups"][0]["betas"] == (0.9, 0.95)
    assert set(got["state"]) == set(expected["state"]) and len(got["state"]) == len(list(model.parameters()))
    for key, entry in got["state"].items():
        assert float(entry["step"]) == float(expected["state"][key]["step"]) == 3.0
        for moment in ("exp_avg", "exp_avg_sq"):
            scale = float(expected["state"][key][moment].abs().max())
            assert float((entry[moment] - expected["state"][key][moment]).abs().max()) <= max(1e-12, 1e-5 * scale)
    assert scheduler.state_dict() == ref_scheduler.state_dict() and scheduler.last_epoch == 3
