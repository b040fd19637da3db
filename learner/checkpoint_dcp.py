"""The sharded optimizer state of a checkpoint (``optimizer/rank-NNNNN``), read back on any number of ranks.

``learner.checkpoint.save_checkpoint_sharded`` has each rank write its own shard with ``torch.distributed.checkpoint``
into a folder of its own, without any exchange between the ranks (``no_dist``: DCP would otherwise swap its plans
between them as pickles). Reading merges the folders' metadata into one checkpoint's, and DCP then gives each rank
the slices its parameters need, whether the ranks now are as many as then, fewer, or one unsharded process.

DCP writes ``.metadata`` with pickle. It is read here by an unpickler that admits only DCP's metadata records,
shapes, dtypes and layouts, so a checkpoint folder can hand this process data, never code.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

DCP_METADATA = ".metadata"
RANK_PREFIX = "rank-"


def rank_folder(rank: int) -> str:
    """The name of rank `rank`'s DCP folder."""
    return f"{RANK_PREFIX}{rank:05d}"


_DCP_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in ("Metadata", "TensorStorageMetadata",
      "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
      "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
}  # fmt: skip
"""What a DCP ``.metadata`` pickle may name: DCP's metadata records, shapes, dtypes, layouts, its checkpoint path."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing any class but DCP's metadata records."""

    def find_class(self, module: str, name: str) -> Any:
        """The class `module.name` when a metadata file may name it; UnpicklingError otherwise."""
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _read_metadata(path: Path) -> Metadata:
    with path.open("rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path} holds no torch.distributed.checkpoint metadata")
    return metadata


def merged_metadata(folder: Path) -> Metadata:
    """The per-rank DCP folders of a sharded optimizer state as one checkpoint's metadata (paths under `folder`)."""
    ranks = sorted(p for p in Path(folder).iterdir() if p.is_dir() and p.name.startswith(RANK_PREFIX))
    if not ranks or [p.name for p in ranks] != [rank_folder(i) for i in range(len(ranks))]:
        raise ValueError(f"{folder} holds no complete set of rank-NNNNN shards: {[p.name for p in ranks]}")
    merged: Metadata | None = None
    for rank_dir in ranks:
        metadata = _read_metadata(rank_dir / DCP_METADATA)
        storage = {index: _relocated(info, rank_dir.name) for index, info in metadata.storage_data.items()}
        if merged is None:
            metadata.storage_data, merged = storage, metadata
            continue
        for key, item in metadata.state_dict_metadata.items():
            known = merged.state_dict_metadata.setdefault(key, item)
            if known is not item and isinstance(item, TensorStorageMetadata):
                assert isinstance(known, TensorStorageMetadata) and known.size == item.size, key
                offsets = {tuple(chunk.offsets) for chunk in known.chunks}
                # replicated entries (AdamW's step counts, the hyper-parameters) are in every rank's folder: once
                known.chunks += [chunk for chunk in item.chunks if tuple(chunk.offsets) not in offsets]
        for index, info in storage.items():
            merged.storage_data.setdefault(index, info)
    assert merged is not None
    return merged


def _relocated(info: Any, rank_dir: str) -> Any:
    """A DCP storage record with its file path made relative to the folder of all ranks."""
    return replace(info, relative_path=f"{rank_dir}/{info.relative_path}")


class _MergedReader(FileSystemReader):
    """Reads the per-rank DCP folders of one sharded optimizer state as a single checkpoint."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self._merged = merged_metadata(folder)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The merged metadata of every rank's folder."""
        return self._merged


def load_sharded_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore an optimizer from the DCP shards in `folder`, whatever the number of ranks that wrote them and that
    read them now (sharded with FSDP or not); each rank reads only what its own parameters need."""
    kinds = [{key: type(value) for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    # An empty AdamW state is initialised here by a zero-lr step; the load below replaces all of it.
    target = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that it loads in one process: no_dist asks exactly for that
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=_MergedReader(folder), no_dist=True)
    set_optimizer_state_dict(model, optimizer, target)
    # DCP keeps sequences as lists: give the hyper-parameters back their own types (AdamW's betas is a tuple).
    for group, types in zip(optimizer.param_groups, kinds, strict=True):
        for key, kind in types.items():
            if kind is tuple and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
