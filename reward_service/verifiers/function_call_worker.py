"""The worker-process side of the function-call verifier: one BFCL-style check under a soft interval timer.

Runs inside the pool processes (``reward_service.verifiers.pool``) that ``FunctionCallVerifier`` starts and kills:
a check whose cost the caller drives (the options of its ground truth times the calls of a response) is bounded by
a kill, not left running on a thread. Only JSON-encoded lists cross the pipe: the tools and the ground truth travel
as JSON text and are parsed with ``json.loads`` here.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Connection
from typing import Any

from reward_service.verifiers.base import Status
from reward_service.verifiers.pool import SoftTimeout, prepare_worker, serve_requests, soft_deadline


def check_within(fields: list[Any]) -> tuple[str, float, str | None, str]:
    """One check (response, tools JSON, ground truth JSON, category, partial credit 0/1, timeout_s) under the soft
    timeout: (status, score, extracted, detail); never raises."""
    from reward_service.verifiers.function_call import TIMEOUT_DETAIL, verify_function_call

    response, tools, truth, category, partial, timeout_s = fields
    try:
        with soft_deadline(float(timeout_s)):
            result = verify_function_call(str(response), json.loads(tools), json.loads(truth), str(category),
                                          partial_credit=bool(partial))  # fmt: skip
    except SoftTimeout:
        return Status.TIMEOUT.value, 0.0, None, TIMEOUT_DETAIL
    except Exception as exc:  # deliberately tolerated: a verifier bug is status error, counted by the service
        return Status.ERROR.value, 0.0, None, f"function-call worker raised {type(exc).__name__}: {str(exc)[:200]}"
    return result.status.value, result.score, result.extracted, result.detail


def worker_main(conn: Connection, memory_limit_mb: int) -> None:
    """Worker process body: say ready, then answer checks until told to stop or the parent is gone."""
    prepare_worker(memory_limit_mb)
    serve_requests(conn, check_within)
