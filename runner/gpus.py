"""Which GPUs each child of ``dipo run`` sees: the learner's and each rollout worker's ``CUDA_VISIBLE_DEVICES``.

NCCL cannot put the weight-sync ranks of two processes on one GPU, and every CUDA process takes the first GPU it
sees, so the launcher hands each side GPUs of its own. GPUs are named as the launcher's own ``CUDA_VISIBLE_DEVICES``
names them (when set; else ``0 .. n-1``) and a child's ``CUDA_VISIBLE_DEVICES`` lists those names: ``3,5,7`` in the
parent gives the children ``3``, ``5`` and ``7``. Nothing here imports torch: ``nvidia-smi -L`` counts the GPUs (and
torch only in a child process when there is no nvidia-smi).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.config import RunConfig

GPU_DISCOVERY_TIMEOUT_S = 60.0


class GpuLayoutError(RuntimeError):
    """The node has too few GPUs for the configured layout, or a configured GPU is not visible."""


GpuLister = Callable[[], list[str]]
"""Returns the GPUs the children may use, named as CUDA_VISIBLE_DEVICES names them."""


def count_gpus(python: str = sys.executable) -> int:
    """The node's GPU count: the ``GPU`` lines of ``nvidia-smi -L``, else torch in a child process (0 if neither)."""
    commands = (["nvidia-smi", "-L"], [python, "-c", "import torch; print(torch.cuda.device_count())"])
    for command in commands:  # torch is never imported here: `services` stays light
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=GPU_DISCOVERY_TIMEOUT_S)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if result.returncode != 0:
            continue
        if command[0] == "nvidia-smi":
            return sum(line.startswith("GPU ") for line in result.stdout.splitlines())
        lines = result.stdout.split()
        return int(lines[-1]) if lines and lines[-1].isdigit() else 0
    return 0


def visible_gpus(environ: Mapping[str, str] | None = None, count: Callable[[], int] = count_gpus) -> list[str]:
    """The GPUs children may use: the launcher's own CUDA_VISIBLE_DEVICES when set, else ``0 .. count() - 1``."""
    listed = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item.strip() for item in listed.split(",") if item.strip()]
    return [str(i) for i in range(count())]


@dataclass(frozen=True)
class GpuLayout:
    """The CUDA_VISIBLE_DEVICES of the learner and of each rollout worker; empty leaves that side's environment be."""

    learner: tuple[str, ...] = ()
    rollout: tuple[str, ...] = ()  # worker i gets rollout[i]

    def describe(self) -> str:
        """One line for the launcher's log, e.g. ``learner: GPUs 0,1 (torchrun, 2 ranks); rollout-0: GPU 2``."""
        parts = []
        if self.learner:
            ranks = f" (torchrun, {len(self.learner)} ranks)" if len(self.learner) > 1 else ""
            parts.append(f"learner: GPU{'s' if len(self.learner) > 1 else ''} {','.join(self.learner)}{ranks}")
        parts += [f"rollout-{i}: GPU {gpu}" for i, gpu in enumerate(self.rollout)]
        return "; ".join(parts) or "no GPUs pinned"


def plan_gpus(cfg: RunConfig, list_gpus: GpuLister = visible_gpus) -> GpuLayout:
    """Give the learner (``learner.device=cuda``) and each rollout worker (``rollout.device=cuda``) GPUs of their own.

    Explicit ``learner.gpus`` / ``rollout.gpus`` are taken as they are; otherwise each rollout worker gets one GPU
    from the end of the visible list and the learner every GPU left. A ``cuda:N`` device is not pinned.
    """
    learner_on = cfg.learner.device == "cuda"
    rollout_on = cfg.rollout.device == "cuda" and cfg.rollout.workers > 0
    if not (learner_on or rollout_on):
        return GpuLayout()
    visible = list_gpus()
    found = f"the launcher sees {len(visible)} GPU(s) ({','.join(visible) or 'none'})"
    explicit = [str(g) for g in (cfg.learner.gpus or []) + (cfg.rollout.gpus or [])]
    unknown = [g for g in explicit if g not in visible]
    if unknown:
        raise GpuLayoutError(
            f"learner.gpus / rollout.gpus name GPU(s) {','.join(unknown)}, but {found}: list GPUs of this node "
            "(numbered as CUDA_VISIBLE_DEVICES lists them when it is set)"
        )
    free = [g for g in visible if g not in explicit]
    rollout_default = rollout_on and cfg.rollout.gpus is None
    learner_default = learner_on and cfg.learner.gpus is None
    needed = (cfg.rollout.workers if rollout_default else 0) + (1 if learner_default else 0)
    if needed > len(free):
        asked = [f"one GPU for each of the {cfg.rollout.workers} rollout workers"] if rollout_default else []
        asked += ["at least one for the learner"] if learner_default else []
        taken = f", {len(explicit)} of them taken by learner.gpus / rollout.gpus" if explicit else ""
        raise GpuLayoutError(
            f"learner.device={cfg.learner.device} and rollout.device={cfg.rollout.device} ask for "
            f"{' and '.join(asked)}: {needed} free GPUs, but {found}{taken}. Lower rollout.workers, run on more GPUs, "
            "or choose the GPUs with --set learner.gpus=[...] --set rollout.gpus=[...] (disjoint lists, one GPU per "
            "rollout worker)"
        )
    rollout: list[str] = []
    if rollout_on:
        rollout = [str(g) for g in cfg.rollout.gpus] if cfg.rollout.gpus is not None else free[-cfg.rollout.workers :]
        free = [g for g in free if g not in rollout]
    learner: list[str] = []
    if learner_on:
        learner = [str(g) for g in cfg.learner.gpus] if cfg.learner.gpus is not None else free
    return GpuLayout(tuple(learner), tuple(rollout))
