"""The sharded optimizer state's reader refuses what is not a complete set of DCP shards, and never runs code from a
checkpoint folder: its ``.metadata`` pickles may name DCP's metadata records only. (The shards themselves are written
and resumed by 2 FSDP ranks in tests/integration/test_checkpoint_sharded.py.)"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from learner.checkpoint import save_checkpoint_sharded
from learner.checkpoint_dcp import DCP_METADATA, merged_metadata, rank_folder


class _RunsACommand:
    """What a hostile pickle carries: unpickling it would call os.system."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_metadata_pickle_naming_anything_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / rank_folder(0)).mkdir()
    (tmp_path / rank_folder(0) / DCP_METADATA).write_bytes(pickle.dumps(_RunsACommand()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        merged_metadata(tmp_path)
    assert not (Path.cwd() / "pwned").exists()


def test_a_metadata_file_must_hold_dcp_metadata(tmp_path: Path) -> None:
    (tmp_path / rank_folder(0)).mkdir()
    (tmp_path / rank_folder(0) / DCP_METADATA).write_bytes(pickle.dumps(torch.Size([3])))
    with pytest.raises(ValueError, match="no torch.distributed.checkpoint metadata"):
        merged_metadata(tmp_path)


@pytest.mark.parametrize("ranks", [[], [0, 2], [1]], ids=["none", "gap", "no-rank-0"])
def test_an_incomplete_set_of_shards_is_refused(ranks: list[int], tmp_path: Path) -> None:
    for rank in ranks:
        (tmp_path / rank_folder(rank)).mkdir()
    with pytest.raises(ValueError, match="no complete set"):
        merged_metadata(tmp_path)


def test_sharded_saving_needs_the_ranks_process_group(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="collective"):
        save_checkpoint_sharded(tmp_path, 1, model, optimizer, None, {})
    assert list(tmp_path.iterdir()) == []
