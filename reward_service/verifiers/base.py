"""What every verifier returns: a status, a score and the answer it extracted."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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
