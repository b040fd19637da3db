"""The system's extension points, each named once: task kinds (verifiers), rollout backends and policy losses.

Every table maps a name to the ``module:attribute`` of its implementation. The kernel names implementations without
importing them (it stays free of torch and of the service packages); the one service that uses an extension point
resolves a name with :func:`load`. The ``Literal`` types beside the tables are what the config and the API models
validate against, so adding an implementation is three files: the implementation, one line here, and its test
(docs/EXTENDING.md walks through one of each).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Literal, get_args

TaskKind = Literal["math", "function_call", "exact"]
VERIFIERS: Mapping[TaskKind, str] = {
    "math": "reward_service.verifiers.math:MathVerifier",
    "function_call": "reward_service.verifiers.function_call:FunctionCallVerifier",
    "exact": "reward_service.verifiers.exact:ExactVerifier",
}
"""Task kind -> the verifier that scores its responses (a ``reward_service.verifiers.base.Verifier``)."""

BackendKind = Literal["hf", "vllm"]
BACKENDS: Mapping[BackendKind, str] = {
    "hf": "rollout_server.backends.hf:HFBackend",
    "vllm": "rollout_server.backends.vllm:VLLMBackend",
}
"""Rollout backend -> its class (a ``rollout_server.backends.base.Backend``)."""

LossName = Literal["dapo", "grpo", "drgrpo", "gspo"]
LOSSES: Mapping[LossName, str] = {
    "dapo": "learner.losses:DapoLoss",
    "grpo": "learner.losses:GrpoLoss",
    "drgrpo": "learner.losses:DrGrpoLoss",
    "gspo": "learner.losses_gspo:GspoLoss",
}
"""Policy loss -> its class (a ``learner.losses.Loss``: surrogate and token normalisation together)."""

TASK_KINDS: tuple[TaskKind, ...] = get_args(TaskKind)
BACKEND_KINDS: tuple[BackendKind, ...] = get_args(BackendKind)
LOSS_NAMES: tuple[LossName, ...] = get_args(LossName)

for _names, _table, _what in ((TASK_KINDS, VERIFIERS, "TaskKind"), (BACKEND_KINDS, BACKENDS, "BackendKind"),
                              (LOSS_NAMES, LOSSES, "LossName")):  # fmt: skip
    if tuple(_table) != _names:
        raise ImportError(f"services/extensions.py: {_what} lists {_names} but its table names {tuple(_table)}")


class UnknownExtension(ValueError):
    """A name that no table of this module lists."""


def resolve(table: Mapping[Any, str], name: str, what: str) -> Any:
    """The implementation ``table`` names for ``name`` (imported now); raises UnknownExtension for an unknown name."""
    path = table.get(name)
    if path is None:
        raise UnknownExtension(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return load(path)


def load(path: str) -> Any:
    """Import ``module:attribute`` and return the attribute."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"extension path {path!r} is not of the form module:attribute")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ImportError(f"{module_name} has no {attribute} (named in services/extensions.py)") from exc
