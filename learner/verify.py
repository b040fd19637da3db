"""``python -m learner.verify CHECKPOINT``: prove a checkpoint folder loads the way a resume loads it.

Loads the weights into a fresh model from the folder's own ``config.json``, builds AdamW over its parameters and
restores the optimizer, scheduler and RNG states with :func:`learner.checkpoint.load_checkpoint`, then checks
that every parameter and optimizer moment is finite. Prints one JSON line (step, version, parameter count,
optimizer entries) and exits 0, or prints the error and exits 1. The chaos runner calls it on the final
checkpoint of a run that was killed many times.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from learner.checkpoint import load_checkpoint


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Load ``path`` completely (weights, optimizer, scheduler, RNG); raise ValueError if anything is off."""
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = load_checkpoint(path, model, optimizer, scheduler)
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"non-finite weights in {bad[:5]}")
    moments = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if any(not torch.isfinite(t).all() for t in moments):
        raise ValueError("non-finite optimizer state")
    return {
        "checkpoint": str(path),
        "step": int(state["step"]),
        "version": int(state["version"]),
        "parameters": sum(p.numel() for p in params),
        "optimizer_entries": len(optimizer.state),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.verify", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="A step-NNNNNN checkpoint folder.")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(verify_checkpoint(args.checkpoint)))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(json.dumps({"checkpoint": str(args.checkpoint), "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
