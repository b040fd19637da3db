"""Verifiers, one per task kind, behind :class:`~reward_service.verifiers.base.Verifier`; the task kinds and their
implementations are named in ``services.extensions.VERIFIERS``."""

from __future__ import annotations

from reward_service.verifiers.base import Verifier
from services.extensions import VERIFIERS, resolve


def verifier_class(task_kind: str) -> type[Verifier]:
    """The verifier registered for ``task_kind`` (ValueError for an unknown kind)."""
    cls: type[Verifier] = resolve(VERIFIERS, task_kind, "task kind")
    return cls
