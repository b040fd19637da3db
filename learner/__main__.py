"""``python -m learner --config FILE [--resume [auto]]`` (or ``torchrun --nproc_per_node N -m learner ...``).

``--resume`` continues the run from its newest checkpoint (what ``dipo run`` passes on restarts). ``--resume auto``
is for containers, whose restart policy starts the same command line again after any exit: it resumes when the
run folder holds a checkpoint and starts fresh when it holds none, and it logs which of the two it chose; when the
newest checkpoint already holds ``learner.steps`` steps the run is complete, and it exits 0 at once (a restarted
pod of a finished run loads no model). Without either, a folder that holds checkpoints is refused (exit 2), so that
a typo in ``run_dir`` never continues the wrong run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

import torch

from learner.checkpoint import STATE_FILE, latest_checkpoint
from learner.distributed import cleanup, init_distributed
from learner.loop import Learner, RunFolderInUse, checkpoint_root
from services.config import load_config, write_resolved_config
from services.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    """Train until the configured number of steps, a SIGTERM, or an error."""
    parser = argparse.ArgumentParser(prog="python -m learner", description="Run the dipo learner (one rank).")
    parser.add_argument("--config", help="YAML run config (defaults < file < DIPO_* env < --set).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config field (repeatable).")  # fmt: skip
    parser.add_argument("--resume", nargs="?", const="yes", default="no", choices=["yes", "auto"],
                        help="Continue from the newest checkpoint of the run; `--resume auto`: continue when the run "
                        "folder holds a checkpoint, start fresh when it holds none (containers).")  # fmt: skip
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
        if args.resume == "auto" and run_is_complete(checkpoint_root(cfg), cfg.learner.steps):
            return 0
        if dist.rank == 0:
            write_resolved_config(cfg)
        learner = Learner(cfg, dist, resume=resume_choice(args.resume, checkpoint_root(cfg)))
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


def run_is_complete(root: Path, steps: int) -> bool:
    """True (and logged) when the newest checkpoint under `root` holds `steps` optimizer steps or more."""
    latest = latest_checkpoint(root)
    if latest is None:
        return False
    done = int(json.loads((latest / STATE_FILE).read_text())["step"])
    if done < steps:
        return False
    logging.getLogger("learner").info("--resume auto: %s holds step %d of learner.steps=%d: the run is complete, "
                                      "nothing to train", latest, done, steps)  # fmt: skip
    return True


def resume_choice(mode: str, root: Path) -> bool:
    """Whether the learner resumes: `yes` always, `no` never (a folder with checkpoints is then refused), `auto`
    when `root` holds a complete checkpoint."""
    if mode != "auto":
        return mode == "yes"
    latest = latest_checkpoint(root)
    log = logging.getLogger("learner")
    if latest is None:
        log.info("--resume auto: no checkpoint under %s, starting a fresh run", root)
        return False
    log.info("--resume auto: resuming from %s", latest)
    return True


if __name__ == "__main__":
    sys.exit(main())
