"""Dispatch a response to the verifier of its task kind, asynchronously, with the service's time bound."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from reward_service.verifiers.base import Status, VerifyResult
from reward_service.verifiers.function_call import verify_function_call
from reward_service.verifiers.math import MathVerifier, MathVerifyOptions
from services.config import RewardConfig
from services.protocol import PromptTask

log = logging.getLogger(__name__)


class Verifiers:
    """The verifier pool of one reward replica.

    Math runs in :class:`MathVerifier`'s process pool with a hard per-item timeout (stuck workers are killed and
    replaced). Function calls are parsed with ``ast`` under strict size and depth caps, so they are bounded by
    construction and run on a worker thread; the same timeout still turns an overrun into ``timeout``.
    """

    def __init__(self, cfg: RewardConfig, *, start_method: str = "forkserver") -> None:
        self.cfg = cfg
        options = MathVerifyOptions(fallbacks=tuple(cfg.math_fallbacks), timeout_s=cfg.verify_timeout_s)
        self.math = MathVerifier(options, num_workers=cfg.verifier_workers, start_method=start_method)  # type: ignore[arg-type]

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Block until every verifier worker has warmed up."""
        return self.math.wait_ready(timeout_s)

    async def verify(self, task: PromptTask, response: str) -> VerifyResult:
        """Verify one response of ``task``; never raises for a bad response, only for a bad task."""
        if task.task_kind == "math":
            if not isinstance(task.ground_truth, str):
                raise ValueError(f"math task {task.prompt_id} needs a string ground truth")
            return await self.math.averify(response, task.ground_truth, self.cfg.verify_timeout_s)
        if task.task_kind == "function_call":
            return await self._verify_call(task, response)
        raise ValueError(f"no verifier for task kind {task.task_kind!r}")

    async def _verify_call(self, task: PromptTask, response: str) -> VerifyResult:
        truth: Any = task.ground_truth
        if isinstance(truth, str):
            truth = json.loads(truth) if truth else []
        if not isinstance(truth, list):
            raise ValueError(f"function-call task {task.prompt_id} needs a list ground truth")
        call = asyncio.to_thread(
            verify_function_call,
            response,
            list(task.tools),
            truth,
            task.category or "simple_python",
            partial_credit=self.cfg.function_call_partial_credit,
        )
        try:
            return await asyncio.wait_for(call, self.cfg.verify_timeout_s)
        except TimeoutError:
            return VerifyResult(Status.TIMEOUT, 0.0, None, "function-call check exceeded its time bound")
        except Exception as exc:  # a verifier bug must not take the replica down; counted as `error`
            log.exception("function-call verifier failed on %s", task.prompt_id)
            return VerifyResult(Status.ERROR, 0.0, None, f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop the verifier processes."""
        self.math.close()
