"""Sampling backends: `hf` (transformers, CPU and tests) and `vllm` (GPUs), behind one interface."""

from __future__ import annotations

import importlib
from typing import Any

from rollout_server.backends.base import Backend, Completion, PromptGroup, Sampling

__all__ = ["Backend", "Completion", "PromptGroup", "Sampling", "create_backend"]

BACKEND_KINDS = ("hf", "vllm")


def create_backend(kind: str, **kwargs: Any) -> Backend:
    """Build a backend by kind; torch-heavy modules are imported only for the kind asked for."""
    if kind == "hf":
        from rollout_server.backends.hf import HFBackend

        return HFBackend(**kwargs)
    if kind == "vllm":
        try:
            module = importlib.import_module("rollout_server.backends.vllm")
        except ModuleNotFoundError as err:
            if err.name == "rollout_server.backends.vllm":
                raise RuntimeError("the vllm backend is not part of this installation; use backend kind 'hf'") from err
            raise RuntimeError(
                f"the vllm backend needs the vllm package ({err}); install it with `pip install -e '.[vllm]'`"
            ) from err
        backend_class = getattr(module, "VLLMBackend", None)
        if backend_class is None:
            raise RuntimeError("rollout_server.backends.vllm must define a VLLMBackend class")
        return backend_class(**kwargs)
    raise ValueError(f"unknown backend kind {kind!r}; use one of {BACKEND_KINDS}")
