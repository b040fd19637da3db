"""The verifier interface (one implementation per task kind, named in ``services.extensions.VERIFIERS``) and what
every verifier returns: a status, a score and the answer it extracted."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from services.config import RewardConfig


class Status(StrEnum):
    """Outcome of one verification. Only ``correct`` means the response is right."""

    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"
    UNPARSABLE = "unparsable"
    TIMEOUT = "timeout"
    ERROR = "error"

    @property
    def is_infrastructure_failure(self) -> bool:
        """True for outcomes that say nothing about the response (the verifier itself failed)."""
        return self in (Status.TIMEOUT, Status.ERROR)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """One verification: ``score`` is the task reward R (1.0/0.0 for binary tasks, shaped for partial credit)."""

    status: Status
    score: float
    extracted: str | None = None
    detail: str = ""

    @property
    def correct(self) -> bool:
        """Correctness c_i of DIPO_SPEC section 1."""
        return self.status is Status.CORRECT


class Question(Protocol):
    """What a verifier reads of a task: a stream ``PromptTask`` and an evaluation ``DataItem`` both are one."""

    @property
    def task_kind(self) -> str: ...

    @property
    def ground_truth(self) -> Any: ...

    @property
    def tools(self) -> list[dict[str, Any]]: ...

    @property
    def category(self) -> str: ...


def done(result: VerifyResult) -> Future[VerifyResult]:
    """A future that already holds ``result`` (for checks decided without a worker)."""
    future: Future[VerifyResult] = Future()
    future.set_result(result)
    return future


class Verifier(ABC):
    """Scores the responses of one task kind; thread-safe; ``close()`` when done.

    ``check`` returns a future that resolves within the verifier's time bound whatever the response: a check
    that runs over resolves with ``timeout``, and a verifier failure with ``error``; it never raises for a
    response. A question the verifier cannot check at all (ground truth of the wrong shape, an unsupported
    category) raises ``ValueError`` from ``validate_question`` and ``check``.
    """

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: RewardConfig) -> Verifier:
        """Build the verifier of one reward replica (or one evaluation) from the reward config."""

    @classmethod
    @abstractmethod
    def validate_question(cls, question: Question) -> None:
        """Raise ValueError when ``question`` cannot be verified by this verifier (checked before generating)."""

    @abstractmethod
    def check(self, response: str, question: Question, timeout_s: float) -> Future[VerifyResult]:
        """Start verifying ``response`` against ``question``; the future resolves within ``timeout_s`` (+ grace)."""

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until any worker processes have warmed up; True when ready."""
        return True

    @property
    def worker_restarts(self) -> int:
        """Worker processes replaced after a hang or crash (a metric of the reward service)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Stop any worker processes and threads."""
