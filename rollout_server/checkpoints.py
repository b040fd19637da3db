"""Checkpoint folders a rollout server loads: validated against the model before any tensor is touched."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from services.contracts import FINGERPRINT_FILE


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded into this server's model (missing, unreadable, or a different model)."""


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a Hugging Face folder's *.safetensors files, read from the headers only."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors files")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # safe_open handles are not iterable
                    if name in shapes:
                        raise CheckpointError(f"{name} appears in more than one file of {folder}")
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return shapes


def read_checkpoint(folder: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Load a folder's weights after checking that their names and shapes are exactly the model's."""
    shapes = checkpoint_shapes(folder)
    problems = [f"missing {name}" for name in sorted(expected.keys() - shapes.keys())]
    problems += [f"unknown {name}" for name in sorted(shapes.keys() - expected.keys())]
    problems += [
        f"{name} has shape {shapes[name]}, expected {tuple(shape)}"
        for name, shape in expected.items()
        if name in shapes and tuple(shapes[name]) != tuple(shape)
    ]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{folder} does not match the model: {'; '.join(problems[:5])}{more}")
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            weights.update(load_file(path, device="cpu"))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return weights


def read_fingerprint(folder: Path) -> str:
    """The fingerprint the learner recorded for a checkpoint's weights (``""`` when it recorded none)."""
    try:
        return (Path(folder) / FINGERPRINT_FILE).read_text().strip()[:128]
    except (FileNotFoundError, UnicodeDecodeError):
        return ""
