"""Entry point of test_learner_fsdp: a ``Learner`` trains a few steps without Redis, publishing and checkpointing.

Under torchrun (2 gloo ranks, ``learner.fsdp=always``) rank 0 drives the steps and ranks > 0 run ``Learner.follow``,
exactly as in the learner's loop; as a plain process it is the single-rank, unsharded reference. After each step rank 0
gathers the full state once (as the loop does when it both publishes and checkpoints), writes a checkpoint from it,
and records the published names; at the end it gathers the weights alone (the publish-only path) and saves them to
``OUT/published.safetensors``. ``--resume`` continues from the run folder's newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from learner.batch import Sample, encode_samples
from learner.distributed import cleanup, init_distributed
from learner.loop import Learner
from services.config import RunConfig, load_config

VOCAB = 64
"""Token ids of the samples stay below this (the tiny model's vocabulary is the tokenizer's, far larger)."""


def build_cfg(model: Path, run_dir: Path) -> RunConfig:
    """The run's config: a large lr with warm-up (so lr and moments must be restored), tiny micro-batches."""
    overrides = {
        "model.name_or_path": model,
        "run_dir": run_dir,
        "learner.lr": 1e-3,
        "learner.warmup_steps": 2,
        "learner.steps": 4,
        "learner.micro_batch_tokens": 64,
        "learner.fsdp": "always",
        "learner.dist_timeout_s": 60,
        "learner.keep_checkpoints": 4,
        "sampling.max_new_tokens": 16,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()], environ={})


def build_samples(step: int, count: int = 9) -> list[Sample]:
    """The batch of `step` (a different one per step): groups of 3 responses sharing a prompt (the shared-prefix
    layout packs each), uneven lengths, so the ranks' shards differ."""
    rng = np.random.default_rng(step)
    samples = []
    for i in range(count):
        if i % 3 == 0:
            prompt = rng.integers(0, VOCAB, int(rng.integers(4, 20))).astype(np.uint32)
        response = rng.integers(0, VOCAB, int(rng.integers(2, 16))).astype(np.uint32)
        behaviour = rng.uniform(-5.0, -3.0, len(response)).astype(np.float32)
        samples.append(Sample(f"s{step}-{i // 3}", prompt, response, behaviour, float(rng.normal()), 1.0, 0))
    return samples


def lead(learner: Learner, steps: int, out: Path) -> None:
    """Rank 0: train, gather, checkpoint; then publish once more (weights only) and release the followers."""
    names: list[list[str]] = []
    try:
        for _ in range(steps):
            learner.train_step(encode_samples(build_samples(learner.step)))
            learner.step += 1
            learner.version += 1
            full = learner.gather(optimizer=True)
            names.append(list(full.weights))
            learner.write_checkpoint({}, full)
        published = learner.gather().weights
        save_file({k: v.detach().cpu().contiguous() for k, v in published.items()}, str(out / "published.safetensors"))
    finally:
        learner.stop_followers()
    (out / "names.json").write_text(json.dumps({"per_step": names, "published": list(published)}))


def main() -> None:
    """Run one learner rank for --steps steps."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = build_cfg(args.model, args.run_dir)
    dist = init_distributed(cfg)
    try:
        learner = Learner(cfg, dist, resume=args.resume)
        if dist.rank == 0:
            (args.out / "info.json").write_text(json.dumps({"world_size": dist.world_size, "fsdp": learner.fsdp}))
            lead(learner, args.steps, args.out)
        else:
            learner.follow()
    finally:
        cleanup()


if __name__ == "__main__":
    main()
