"""torchrun wiring of the learner: the default process group and the few collectives the train step needs.

Launched by torchrun (``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR`` in the environment) the learner joins one default
process group: gloo on CPU, NCCL on CUDA (each rank on its ``LOCAL_RANK`` device). Launched as a plain process it
runs alone and no group exists; every helper here then degrades to the single-rank result, so the train step has one
code path. The group is created with an explicit timeout, which gloo and NCCL apply to every collective issued on
it (``learner.dist_timeout_s`` unless given): a dead peer surfaces as an error instead of a hang. A torchrun rank
dies with torchrun (``die_with_parent``), so stopping torchrun stops every rank.

Only tensors cross ranks. ``broadcast_bytes`` sends a length and then a uint8 tensor, never a pickled object
(``broadcast_object_list`` unpickles whatever it receives).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from services.config import RunConfig

logger = logging.getLogger(__name__)

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class DistInfo:
    """Where this learner rank sits: its global rank, the world size, its local rank and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that reads streams, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank exists."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables are set."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    torchrun starts every rank in a session of its own, so killing torchrun's process group misses the ranks: without
    this a SIGKILL of torchrun (the launcher's last resort, the OOM killer) would leave them holding their GPUs.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank outlives torchrun", ctypes.get_errno())
    elif os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(cfg: RunConfig, timeout_s: float | None = None) -> DistInfo:
    """Join the default process group when launched by torchrun (gloo on CPU, NCCL on CUDA); else run alone.

    `timeout_s` bounds every collective of the group; None takes ``cfg.learner.dist_timeout_s``.
    """
    if timeout_s is None:
        timeout_s = cfg.learner.dist_timeout_s
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    wants_cuda = cfg.learner.device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise ValueError(f"learner.device={cfg.learner.device!r} but CUDA is not available: set learner.device=cpu")
    if not launched_by_torchrun():
        device = torch.device(cfg.learner.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)

    die_with_parent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wants_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    logger.info("learner rank %d/%d on %s (%s, timeout %.0f s)", rank, world, device, backend, timeout_s)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """The device that collectives' tensors must live on for the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Return `data` from rank `src` on every rank (a length, then a uint8 tensor); other ranks pass None."""
    if not _active():
        if data is None:
            raise ValueError("broadcast_bytes without a process group needs the data on the only rank")
        return data
    device = _comm_device()
    is_src = dist.get_rank() == src
    if is_src and data is None:
        raise ValueError(f"rank {src} is the source of broadcast_bytes and must pass the data")
    length = torch.tensor([len(data) if is_src and data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(length, src=src)
    size = int(length.item())
    if is_src and data is not None:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if size else torch.empty(0)
    else:
        payload = torch.empty(size, dtype=torch.uint8, device=device)
    if size:
        dist.broadcast(payload, src=src)
    return data if is_src and data is not None else payload.cpu().numpy().tobytes()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it (unchanged without a process group)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Take the elementwise max of `tensor` over all ranks in place and return it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait for every rank (bounded by the group's timeout); a no-op without a process group."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
