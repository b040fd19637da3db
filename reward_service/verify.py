"""The verifiers of one reward replica (or one evaluation), one per task kind, behind one time-bounded call.

The reward worker, ``POST /v1/score`` and ``dipo eval`` all verify through :class:`Verifiers`, so a response gets
the same status, score and time bound wherever it is checked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future

from reward_service.verifiers import verifier_class
from reward_service.verifiers.base import Question, Verifier, VerifyResult
from services.config import RewardConfig
from services.extensions import TASK_KINDS

log = logging.getLogger(__name__)


class Verifiers:
    """One verifier per task kind, built on first use (``kinds`` are started at once, e.g. to warm math workers)."""

    def __init__(self, cfg: RewardConfig, kinds: Iterable[str] = TASK_KINDS) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._verifiers: dict[str, Verifier] = {}
        for kind in kinds:
            self.get(kind)

    def get(self, task_kind: str) -> Verifier:
        """The verifier of ``task_kind`` (ValueError for a kind no verifier is registered for)."""
        with self._lock:
            verifier = self._verifiers.get(task_kind)
            if verifier is None:
                verifier = self._verifiers[task_kind] = verifier_class(task_kind).from_config(self.cfg)
            return verifier

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Block until every started verifier's workers have warmed up."""
        with self._lock:
            started = list(self._verifiers.values())
        return all(v.wait_ready(timeout_s) for v in started)

    @property
    def worker_restarts(self) -> int:
        """Verifier worker processes replaced so far, over every task kind."""
        with self._lock:
            return sum(v.worker_restarts for v in self._verifiers.values())

    @staticmethod
    def validate(question: Question) -> None:
        """Raise ValueError when no verifier can check ``question`` (an unknown kind, a malformed ground truth)."""
        verifier_class(question.task_kind).validate_question(question)

    def submit(self, question: Question, response: str) -> Future[VerifyResult]:
        """Start one verification; the future resolves within the configured time bound."""
        return self.get(question.task_kind).check(response, question, self.cfg.verify_timeout_s)

    async def verify(self, question: Question, response: str) -> VerifyResult:
        """Verify one response; never raises for a bad response, only (ValueError) for a bad question."""
        # On a worker thread: a full verifier queue blocks there, never the event loop.
        future = await asyncio.to_thread(self.submit, question, response)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop every verifier."""
        with self._lock:
            verifiers, self._verifiers = list(self._verifiers.values()), {}
        for verifier in verifiers:
            verifier.close()
