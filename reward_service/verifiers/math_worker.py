"""The worker-process side of the math verifier: math-verify comparisons under a soft interval timer.

Runs inside the pool processes (``reward_service.verifiers.pool``) that ``MathVerifier`` starts and kills; only
JSON-encoded lists of str/float cross the pipe.
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection

from reward_service.verifiers.base import Status
from reward_service.verifiers.pool import SoftTimeout, prepare_worker, serve_requests, soft_deadline

# First comparisons of each kind fill sympy's caches (up to ~0.8 s each); paying that at worker start keeps it out
# of the first real items' latency and timeout.
_WARM_UP = (("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{10}"), ("[1, 2)", "(1, 2]"), ("x^2+1", "(x+1)^2"))


def _parse_answer(text: str, boxed_first: bool) -> list[object]:
    """math-verify parse of ``text``, trying it wrapped in ``\\boxed{}`` and raw, in the given order."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    candidates = ["\\boxed{" + text + "}", text]
    for candidate in candidates if boxed_first else candidates[::-1]:
        # parsing_timeout=None: math-verify's own signal.alarm would fight ours; our timer bounds the call.
        parsed = parse(candidate, config, fallback_mode="no_fallback", parsing_timeout=None)
        if parsed:
            return list(parsed)
    return []


def _compare(answer: str, source: str, gold: str, rounding: int, precision: int) -> tuple[str, str]:
    """Status and detail of one comparison, without any time bound."""
    from math_verify import verify

    gold_parsed = _parse_answer(gold, boxed_first=True)
    if not gold_parsed:
        return Status.UNPARSABLE.value, "gold answer is not parsable by math-verify"
    # Boxed answers are LaTeX; fallback lines are prose, where math-verify's own extraction does better raw.
    answer_parsed = _parse_answer(answer, boxed_first=source == "boxed")
    if not answer_parsed:
        return Status.UNPARSABLE.value, "answer is not parsable by math-verify"
    same = verify(
        gold_parsed, answer_parsed, float_rounding=rounding, numeric_precision=precision, timeout_seconds=None
    )
    return (Status.CORRECT.value if same else Status.WRONG.value), ""


def _compare_within(fields: list[str | float], rounding: int, precision: int) -> tuple[str, str]:
    """Run one comparison (answer, source, gold, timeout_s) under the worker's soft timeout; never raises."""
    answer, source, gold, timeout_s = fields
    try:
        with soft_deadline(float(timeout_s)):
            return _compare(str(answer), str(source), str(gold), rounding, precision)
    except SoftTimeout:
        return Status.TIMEOUT.value, f"comparison exceeded {float(timeout_s):g} s (soft timeout)"
    except Exception as exc:  # deliberately tolerated: reported as status error, counted by the service
        return Status.ERROR.value, f"math worker raised {type(exc).__name__}: {str(exc)[:200]}"


def worker_main(conn: Connection, rounding: int, precision: int, memory_limit_mb: int) -> None:
    """Worker process body: warm up, say ready, then answer requests until told to stop or the parent is gone."""
    prepare_worker(memory_limit_mb)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every timeout we configure away
    for answer, gold in _WARM_UP:
        _compare(answer, "boxed", gold, rounding, precision)
    serve_requests(conn, lambda fields: _compare_within(fields, rounding, precision))
