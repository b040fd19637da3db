"""Learner checkpoints: HF safetensors weights, optimizer, scheduler, RNG and trainer state, written atomically.

Layout under the checkpoint root::

    step-000010/                 complete checkpoints only (the name appears by one atomic rename)
        config.json, model.safetensors (or shards + index), tokenizer files when given
        optimizer.pt, scheduler.pt, rng.pt
        trainer_state.json       written last; {"step": ..., plus the caller's state}
    latest                       text file naming the newest complete folder, replaced by rename
    .tmp-step-000020/            a save in progress, or the leftover of a crash: ignored, removed by the next save

A crash at any point leaves either the previous checkpoint or the new one as `latest`, never a partial folder.
Deleting a folder (pruning, replacing a step) first renames it to a `.tmp-` name, so a crash mid-delete leaves
only ignored debris. The `.pt` files are our own, never cross a trust boundary, and load with `weights_only=True`.

Under FSDP there are two ways to write one. ``save_checkpoint`` with the state of ``gather_full_state`` (a
collective: every rank calls it) writes the full optimizer state as ``optimizer.pt``, which rank 0 must hold in
memory (8 bytes per parameter with AdamW). ``save_checkpoint_sharded`` (also called by every rank) gathers only the
weights, which the Hugging Face files need for vLLM and late joiners, and has every rank write its own shard of the
optimizer state with ``torch.distributed.checkpoint``::

    optimizer/rank-00000/.metadata, __0_0.distcp    one DCP folder per rank, written without any exchange between
    optimizer/rank-00001/...                        the ranks (no_dist), so no pickled plans cross between them

On resume the weights are loaded before sharding (``load_weights``) and ``load_checkpoint`` restores the optimizer
from whichever of the two the folder holds: ``optimizer.pt`` is cut into each rank's shard, the DCP folders are read
through their merged metadata, which DCP reshards to the ranks at hand. So a checkpoint of either kind resumes on
any number of ranks, one unsharded process included. DCP writes its ``.metadata`` with pickle; it is read back with
an unpickler that admits only DCP's own metadata classes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from learner.checkpoint_dcp import load_sharded_optimizer_state, rank_folder

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
OPTIMIZER_DIR = "optimizer"
"""A sharded checkpoint's optimizer state: one torch.distributed.checkpoint folder per rank (``rank-NNNNN``)."""
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


CHECKPOINT_BYTES_PER_PARAMETER = 12
"""fp32 weights in the Hugging Face export (4) and AdamW's two fp32 moments (8), in one checkpoint."""


def run_volume_bytes(parameters: int, keep: int, base_model_bytes_per_parameter: int = 4) -> int:
    """The bytes a run folder needs for a model of `parameters` parameters: `keep` + 1 checkpoints (the new one is
    written before the oldest is pruned) of 12 bytes per parameter, plus the base model's own copy (fp32: 4)."""
    return (keep + 1) * CHECKPOINT_BYTES_PER_PARAMETER * parameters + base_model_bytes_per_parameter * parameters


def checkpoint_dir_name(step: int) -> str:
    """Folder name of the checkpoint of `step` (zero-padded so names sort like steps)."""
    return f"{STEP_PREFIX}{step:06d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync_path(path)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def _discard(folder: Path) -> None:
    """Delete a folder crash-safely: rename it out of the step-* namespace first, then remove it."""
    trash = folder.with_name(f"{TMP_PREFIX}discard-{folder.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(folder, trash)
    _fsync_path(folder.parent)
    shutil.rmtree(trash)


def _is_complete(folder: Path) -> bool:
    return _STEP_RE.match(folder.name) is not None and (folder / STATE_FILE).is_file()


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders under root, sorted by step."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and _is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's key array is stored as a tensor so that weights_only loading accepts it
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning(
                "CUDA RNG state not restored: saved for %d devices, %d present",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )


def _write_latest(root: Path, folder_name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST_FILE}"
    with tmp.open("w") as handle:
        handle.write(folder_name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync_path(root)


def _clean_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            logger.warning("removing %s, left over from an interrupted checkpoint write", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _prune(root: Path, keep: int, just_written: Path) -> None:
    """Keep the folder just written plus the keep - 1 highest other steps."""
    others = [path for _, path in _complete_checkpoints(root) if path != just_written]
    for path in others[: max(0, len(others) - (keep - 1))]:
        logger.info("pruning checkpoint %s", path)
        _discard(path)


@dataclass
class _Contents:
    """What goes into a checkpoint folder besides the JSON state."""

    model: Any
    optimizer_state: dict[str, Any] | None
    """None when every rank wrote its shard of it into ``optimizer/`` (sharded checkpoints)."""
    scheduler: Any
    tokenizer: Any
    weights: dict[str, torch.Tensor] | None


def _write_contents(folder: Path, contents: _Contents, rng: dict[str, Any], state_json: str) -> None:
    # safetensors is the default serialisation (and the only one in transformers 5)
    if contents.weights is None:
        contents.model.save_pretrained(folder)
    else:
        contents.model.save_pretrained(folder, state_dict=contents.weights)
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_INDEX_FILE).is_file():
        raise RuntimeError(f"save_pretrained wrote no safetensors weights into {folder}")
    if contents.tokenizer is not None:
        contents.tokenizer.save_pretrained(folder)
    if contents.optimizer_state is not None:
        torch.save(contents.optimizer_state, folder / OPTIMIZER_FILE)
    if contents.scheduler is not None:
        torch.save(contents.scheduler.state_dict(), folder / SCHEDULER_FILE)
    torch.save(rng, folder / RNG_FILE)
    # Last file written: a step-* folder without it is not a checkpoint
    (folder / STATE_FILE).write_text(state_json)


@dataclass
class _Pending:
    """A checkpoint being written: its `.tmp-` folder, the JSON state and the RNG states taken at the start."""

    root: Path
    name: str
    keep: int
    state_json: str
    rng: dict[str, Any]

    @property
    def tmp(self) -> Path:
        """The folder the files are written into, renamed to `name` once complete."""
        return self.root / f"{TMP_PREFIX}{self.name}"


def _begin(root: Path, step: int, state: dict[str, Any], keep: int) -> _Pending:
    """Check the arguments, take the RNG states and make an empty `.tmp-` folder (after removing leftovers)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step']={state['step']} disagrees with step={step}")
    # Serialise first: a state that is not JSON-able fails before anything touches the disk
    state_json = json.dumps({**state, "step": step}, indent=2, sort_keys=True, allow_nan=False)
    # Taken before any work, so the states restored on resume are those the training loop stood at
    pending = _Pending(Path(root), checkpoint_dir_name(step), keep, state_json, _rng_state())
    pending.root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(pending.root)
    pending.tmp.mkdir()
    return pending


def _commit(pending: _Pending, contents: _Contents) -> Path:
    """Write the files, make them durable, rename the folder into place, point `latest` at it and prune."""
    _write_contents(pending.tmp, contents, pending.rng, pending.state_json)
    _fsync_tree(pending.tmp)
    final = pending.root / pending.name
    if final.exists():
        logger.warning("replacing existing checkpoint %s", final)
        _discard(final)
    os.rename(pending.tmp, final)
    _fsync_path(pending.root)
    _write_latest(pending.root, pending.name)
    _prune(pending.root, pending.keep, final)
    logger.info("checkpoint written: %s", final)
    return final


def save_checkpoint(
    root: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any = None,
    keep: int = 2,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` under root atomically, point `latest` at it, prune to `keep`; return its folder.

    `model` is an unwrapped Hugging Face model; `state` is JSON-able (step and version, feeder position, used
    prompt ids, ...). Under FSDP pass the `weights` and `optimizer_state` of ``gather_full_state`` (rank 0 only):
    they are written instead of the model's and optimizer's own, which are shards; `optimizer` may then be None.
    """
    if optimizer_state is None and optimizer is None:
        raise ValueError("save_checkpoint needs an optimizer or its optimizer_state")
    pending = _begin(root, step, state, keep)
    full = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    return _commit(pending, _Contents(model, full, scheduler, tokenizer, weights))


def save_checkpoint_sharded(
    root: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any = None,
    keep: int = 2,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    gather_weights: bool = False,
) -> Path | None:
    """Write checkpoint `step` with every rank's optimizer shard in ``optimizer/rank-NNNNN`` (a collective: every rank
    calls it at the same point); returns the folder on rank 0, None on the others.

    Rank 0 writes everything else exactly as ``save_checkpoint`` does, the Hugging Face weights included: from
    `weights` (``gather_full_state(model, sharded=True).checkpoint_weights()``, which rank 0 may hold already from
    the step's weight broadcast), or, with ``gather_weights=True`` on every rank, from a gather made here. `state`,
    `tokenizer`, `keep` and `weights` matter on rank 0 only. Nothing is exchanged between the ranks but barriers.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("save_checkpoint_sharded is a collective of the learner's ranks; alone, use save_checkpoint")
    rank = dist.get_rank()
    if gather_weights:
        weights = gather_full_state(model, sharded=True).checkpoint_weights()
    pending = _begin(root, step, state, keep) if rank == 0 else None
    dist.barrier()  # the .tmp- folder exists (and no leftover of an older attempt does) before any rank writes
    folder = Path(root) / f"{TMP_PREFIX}{checkpoint_dir_name(step)}" / OPTIMIZER_DIR
    sharded = bool(optimizer.state)  # the same on every rank: they stepped together
    if sharded:
        writer = FileSystemWriter(str(folder / rank_folder(rank)), sync_files=True)
        dcp.save(get_optimizer_state_dict(model, optimizer), storage_writer=writer, no_dist=True)
    dist.barrier()  # every shard is on disk before rank 0 completes the folder
    if pending is None:
        return None
    if rank == 0 and weights is None:
        raise ValueError("rank 0 needs the gathered weights: pass weights=..., or gather_weights=True on every rank")
    # Before the first step the state is only the hyper-parameters: one small optimizer.pt, as save_checkpoint writes.
    full = None if sharded else optimizer.state_dict()
    return _commit(pending, _Contents(model, full, scheduler, tokenizer, weights))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root: the one `latest` names, else the highest complete step, else None."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.parent == root and _is_complete(named):
            return named
        logger.warning("%s names %s, which is not a complete checkpoint; scanning %s", pointer, named, root)
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The policy weights of a checkpoint folder as a state dict (safetensors, single file or sharded), on CPU."""
    path = Path(path)
    index = path / WEIGHTS_INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(path / shard, device="cpu"))
        return weights
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")
    return load_file(path / WEIGHTS_FILE, device="cpu")


def _load_into_model(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint has weights the model does not: {sorted(unexpected)[:5]}")
    # save_pretrained drops tied copies (lm_head.weight tied to the embeddings): those may be missing, nothing else
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in weights if k in params}
    untied = [k for k in missing if params[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"checkpoint lacks weights of the model: {sorted(untied)[:5]}")


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint folder's policy weights into an unsharded model (under FSDP: before sharding it)."""
    _load_into_model(model, load_model_weights(Path(path)))


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    weights: bool = True,
    sharded: bool = False,
) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and RNG states from a checkpoint folder; return its trainer state.

    With ``weights=False`` the weights are taken as loaded already. ``sharded=True`` means the model is sharded with
    FSDP: its weights must have been loaded before sharding (``load_weights``), and every rank must call this at
    the same time, since a full optimizer state is cut into shards collectively. An optimizer state written sharded
    (``optimizer/``) loads on any number of ranks, sharded or not.
    """
    path = Path(path)
    if not _is_complete(path):
        raise ValueError(f"{path} is not a complete checkpoint folder (step-NNNNNN with {STATE_FILE})")
    if sharded and weights:
        raise ValueError("a sharded model cannot take full weights: call load_weights before sharding, weights=False")
    if weights:
        load_weights(path, model)
    if optimizer is not None and (path / OPTIMIZER_DIR).is_dir():
        load_sharded_optimizer_state(model, optimizer, path / OPTIMIZER_DIR)
    elif optimizer is not None:
        saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        if sharded:
            load_full_optimizer_state(model, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / RNG_FILE, map_location="cpu", weights_only=True))
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
    return state


# ---------------------------------------------------------------------- FSDP: full state from shards and back


@dataclass
class FullState:
    """A policy's full (unsharded) state as rank 0 publishes and checkpoints it; empty on other ranks under FSDP."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """The unwrapped model's ``named_parameters()`` (tied weights once): what rollout servers receive."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """Persistent buffers, which checkpoints hold too (only filled when gathered)."""
    optimizer: dict[str, Any] | None = None
    """The optimizer state in ``optimizer.state_dict()``'s layout (parameter ids), when asked for."""
    gathered: bool = False
    """True for gathered CPU copies (FSDP); False for the model's own tensors (replicated ranks)."""

    def checkpoint_weights(self) -> dict[str, torch.Tensor] | None:
        """The state dict a checkpoint writes: the gathered one, or None to let the model save its own."""
        return {**self.weights, **self.buffers} if self.gathered else None


_FULL_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Gather every DTensor, keep the result on CPU on rank 0 only (other ranks get empty dicts)."""


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its id order (the order ``optimizer.state_dict()`` numbers them)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _renumber(state: dict[str, Any], keys: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with its parameter keys mapped through `keys` (ids <-> names)."""
    return {
        "state": {keys[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [keys[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def gather_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, sharded: bool
) -> FullState:
    """The model's full weights (and the optimizer's full state); with ``sharded=True`` a collective over all ranks.

    `model` is the unwrapped Hugging Face model (whose submodules FSDP sharded), so the names are its own
    ``named_parameters()`` names, e.g. ``model.embed_tokens.weight``. Unsharded, the model's own tensors are returned.
    """
    if not sharded:
        return FullState(dict(model.named_parameters()), optimizer=optimizer.state_dict() if optimizer else None)
    full = get_model_state_dict(model, options=_FULL_CPU)
    names = [name for name, _ in model.named_parameters()]
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)}  # tied copies appear twice
    state = FullState({n: full[n] for n in names if n in full}, gathered=True)
    state.buffers = {k: v for k, v in full.items() if k not in aliases}
    if optimizer is not None:
        state.optimizer = _gather_optimizer(model, optimizer)
    return state


def _gather_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not optimizer.state:
        # get_optimizer_state_dict would initialise an empty state by a zero step (AdamW's count would start at 1).
        # Emptiness is the same on every rank, so all of them skip the collective together.
        return optimizer.state_dict()
    full = get_optimizer_state_dict(model, optimizer, options=_FULL_CPU)
    if not full:  # ranks > 0
        return {}
    return _renumber(full, {name: i for i, name in enumerate(_param_names(model, optimizer))})


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Give each FSDP rank its shard of a full optimizer state (``state_dict()`` layout); every rank calls it."""
    if not saved["state"]:  # no step was taken: nothing to shard, only the hyper-parameters
        optimizer.load_state_dict(saved)
        return
    names = dict(enumerate(_param_names(model, optimizer)))
    # Every rank holds the full state (read from the shared checkpoint), so nothing but tensors crosses ranks:
    # broadcast_from_rank0 would send the non-tensor entries with broadcast_object_list, which pickles.
    set_optimizer_state_dict(model, optimizer, _renumber(saved, names), options=StateDictOptions(full_state_dict=True))
    # Its flattening turns tuples (AdamW's betas) into lists: restore the hyper-parameters exactly as saved.
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
