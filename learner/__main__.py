"""``python -m learner --config FILE [--resume]`` (or ``torchrun --nproc_per_node N -m learner ...``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import torch

from learner.distributed import cleanup, init_distributed
from learner.loop import Learner, RunFolderInUse
from services.config import load_config, write_resolved_config
from services.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    """Train until the configured number of steps, a SIGTERM, or an error."""
    parser = argparse.ArgumentParser(prog="python -m learner", description="Run the dipo learner (one rank).")
    parser.add_argument("--config", help="YAML run config (defaults < file < DIPO_* env < --set).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config field (repeatable).")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint of the run.")
    parser.add_argument("--log-file", help="Also log to this file.")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    dist = init_distributed(cfg, timeout_s=cfg.learner.dist_timeout_s)
    setup_logging(
        cfg.log_level,
        f"learner{dist.rank}",
        Path(args.log_file) if args.log_file else None,
    )
    torch.set_num_threads(cfg.learner.torch_threads)
    if dist.rank != 0:
        # torchrun passes a stop on to every rank, but rank 0 owns the shutdown: it ends the step and checkpoints
        # (under FSDP with every rank in the gather), then releases the others; torchrun kills a rank that hangs
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    try:
        if dist.rank == 0:
            write_resolved_config(cfg)
        learner = Learner(cfg, dist, resume=args.resume)
        if dist.rank == 0:
            asyncio.run(learner.run())
        else:
            learner.follow()
    except RunFolderInUse as exc:
        logging.getLogger("learner").error("%s", exc)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
