"""Tests of the math verifier: answer extraction, math-verify comparison, and the killable worker pool."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from reward_service.verifiers.base import Status
from reward_service.verifiers.math import (
    MathVerifier,
    MathVerifyOptions,
    extract_answer,
    shape_problem,
)

HANG_TIMEOUT_S = 1.5
# A correctness bound of the timeout mechanism (soft timeout, then kill grace, then slack for a loaded 2-core
# machine), not a speed target: without the mechanism these items would run for minutes or forever.
HANG_BOUND_S = HANG_TIMEOUT_S + MathVerifyOptions().kill_grace_s + 8.0
GAVE_UP = {Status.TIMEOUT, Status.UNPARSABLE, Status.WRONG}


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    pool = MathVerifier(num_workers=2)
    assert pool.wait_ready(120), "math workers did not warm up"
    yield pool
    pool.close()


def wait_for(condition: object, limit_s: float = 60.0) -> bool:
    """Poll a zero-argument callable until it is truthy or the limit passes."""
    assert callable(condition)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------- extraction


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("first \\boxed{1}, then corrected: \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and at last \\fbox{5}", "5"),
        ("$\\boxed 9$", "9"),
        ("\\boxed {x+1}", "x+1"),
        ("\\boxedfoo \\boxed{4} \\boxedbar", "4"),
        ("\\boxed{$12$}", "12"),
    ],
)
def test_extracts_last_box(response: str, expected: str) -> None:
    found = extract_answer(response)
    assert (found.answer, found.source) == (expected, "boxed")


def test_unclosed_last_box_is_no_answer_even_if_an_earlier_box_closes() -> None:
    found = extract_answer("\\boxed{1} ... \\boxed{\\frac{2}{3}", MathVerifyOptions(fallbacks=()))
    assert found.answer is None
    assert "never closed" in found.problem


@pytest.mark.parametrize(
    ("response", "expected", "source"),
    [
        ("reasoning...\nAnswer: 17\n", "17", "answer_line"),
        ("**Final Answer:** $\\frac{3}{4}$.", "\\frac{3}{4}", "answer_line"),
        ("steps\n#### 1,234", "1,234", "hashes"),
        ("Answer: 3\n#### 5", "3", "answer_line"),
    ],
)
def test_fallbacks_when_enabled(response: str, expected: str, source: str) -> None:
    found = extract_answer(response)
    assert (found.answer, found.source) == (expected, source)


def test_fallback_order_and_disabling() -> None:
    text = "Answer: 3\n#### 5"
    assert extract_answer(text, MathVerifyOptions(fallbacks=("hashes", "answer_line"))).answer == "5"
    assert extract_answer(text, MathVerifyOptions(fallbacks=())).answer is None
    assert extract_answer("Answer: 3 \\boxed{4}").answer == "4"


def test_unknown_fallback_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown math fallbacks"):
        MathVerifyOptions(fallbacks=("last_number",))


def test_long_response_keeps_its_tail() -> None:
    options = MathVerifyOptions(max_response_chars=1_000)
    assert extract_answer("\\boxed{1}" + "x" * 5_000 + "\\boxed{2}", options).answer == "2"
    assert extract_answer("\\boxed{1}" + "x" * 5_000, options).answer is None


@pytest.mark.parametrize(
    "response",
    [
        "{" * 2_000_000,
        "\\boxed{" + "{" * 1_000_000,
        "\\boxedx" * 200_000,
        "\\\\" * 1_000_000 + "\\boxed{1",
        ("word " * 200_000) + "Answer:" + "$" * 100_000,
    ],
    ids=["braces", "unclosed-box", "false-markers", "backslashes", "answer-line-of-dollars"],
)
def test_megabyte_inputs_extract_without_answer(response: str) -> None:
    assert extract_answer(response, MathVerifyOptions(max_response_chars=10**8)).answer is None


def test_shape_limits() -> None:
    assert shape_problem("1" * 1_001, "answer", 1_000, 64) is not None
    assert shape_problem("{" * 65 + "}" * 65, "answer", 1_000, 64) is not None
    assert shape_problem("\\frac{(1+2)}{[3]}", "answer", 1_000, 64) is None


# ---------------------------------------- comparison


@pytest.mark.parametrize(
    ("response", "gold", "status"),
    [
        ("\\boxed{42}", "42", Status.CORRECT),
        ("\\boxed{41}", "42", Status.WRONG),
        ("\\boxed{1/2}", "0.5", Status.CORRECT),
        ("\\boxed{0.5}", "\\frac{1}{2}", Status.CORRECT),
        ("\\boxed{\\dfrac{3}{4}}", "0.75", Status.CORRECT),
        ("\\boxed{\\frac{1}{3}}", "0.5", Status.WRONG),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", Status.CORRECT),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", Status.WRONG),
        ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", Status.CORRECT),
        ("\\boxed{\\{1, 3\\}}", "\\{2, 1\\}", Status.WRONG),
        ("\\boxed{[1, 2)}", "[1,2)", Status.CORRECT),
        ("\\boxed{(1, 2]}", "[1,2)", Status.WRONG),
        ("\\boxed{-3}", "-3", Status.CORRECT),
        ("\\boxed{3}", "-3", Status.WRONG),
        ("\\boxed{50\\%}", "0.5", Status.CORRECT),
        ("\\boxed{1,000}", "1000", Status.CORRECT),
        ("\\boxed{x = 5}", "5", Status.CORRECT),
        ("first \\boxed{7} then \\boxed{8}", "8", Status.CORRECT),
        ("first \\boxed{8} then \\boxed{7}", "8", Status.WRONG),
        ("Answer: The answer is 12.", "12", Status.CORRECT),
        ("#### 1,234", "1234", Status.CORRECT),
        ("no final answer here", "1", Status.NO_ANSWER),
        ("\\boxed{}", "1", Status.NO_ANSWER),
        ("\\boxed{3", "3", Status.NO_ANSWER),
        ("\\boxed{\\frac{}{}}", "1", Status.UNPARSABLE),
        ("\\boxed{3}", "\\frac{", Status.UNPARSABLE),
        ("\\boxed{3}", "\\boxed{3}", Status.CORRECT),
    ],
)
def test_statuses(verifier: MathVerifier, response: str, gold: str, status: Status) -> None:
    result = verifier.verify(response, gold, timeout_s=5.0)
    assert result.status is status, result
    assert result.score == (1.0 if status is Status.CORRECT else 0.0)


@pytest.mark.parametrize("response", ["\\boxed{3 + 5}", "\\boxed{9 - 1}", "\\boxed{3+5+0}", "\\boxed{2^{3}}"])
def test_the_question_copied_into_the_box_is_wrong(verifier: MathVerifier, response: str) -> None:
    """Reward hacking on "What is 3 + 5?": an expression equal to the gold number does not score (answer_form)."""
    result = verifier.verify(response, "8")
    assert result.status is Status.WRONG, result
    assert "number literal" in result.detail
    with MathVerifier(MathVerifyOptions(answer_form="any"), num_workers=1) as lenient:
        assert lenient.verify(response, "8").status is Status.CORRECT  # math-verify alone calls them equal


@pytest.mark.parametrize(
    ("response", "gold", "form", "status"),
    [
        ("\\boxed{8}", "8", "auto", Status.CORRECT),
        ("\\boxed{\\$1{,}234}", "1234", "auto", Status.CORRECT),
        ("\\boxed{18 \\text{ dollars}}", "18", "auto", Status.CORRECT),
        ("\\boxed{(x+1)^2 - 2x}", "x^2+1", "auto", Status.CORRECT),  # a symbolic gold takes any expression
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", "auto", Status.CORRECT),
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", "number", Status.WRONG),
        ("\\boxed{\\frac{3}{4}}", "0.75", "number", Status.CORRECT),
    ],
)
def test_answer_form_rules(response: str, gold: str, form: str, status: Status) -> None:
    with MathVerifier(MathVerifyOptions(answer_form=form), num_workers=1) as pool:
        assert pool.verify(response, gold).status is status


def test_unknown_answer_form_is_rejected() -> None:
    with pytest.raises(ValueError, match="answer_form"):
        MathVerifyOptions(answer_form="numeric")


def test_fallbacks_off_give_no_answer(verifier: MathVerifier) -> None:
    assert verifier.verify("Answer: 12", "12").status is Status.CORRECT
    # A missing answer is decided in the parent, so this pool never needs its (still starting) worker.
    with MathVerifier(MathVerifyOptions(fallbacks=()), num_workers=1) as strict:
        result = strict.verify("Answer: 12", "12")
    assert result.status is Status.NO_ANSWER


def test_extracted_answer_is_reported(verifier: MathVerifier) -> None:
    result = verifier.verify("work... \\boxed{\\frac{1}{2}}.", "0.5")
    assert (result.status, result.extracted) == (Status.CORRECT, "\\frac{1}{2}")


# ---------------------------------------- pathological


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{9^{9^{9^{9^{9}}}}}",
        "\\boxed{(10^{10})!}",
        "\\boxed{" + "1+" * 50_000 + "1}",
        "\\boxed{" + "{" * 5_000 + "1" + "}" * 5_000 + "}",
        "\\boxed{" + "\\frac{" * 40 + "1" + "}{2}" * 40 + "}",
        "lorem ipsum " * 100_000 + "\\boxed{" + "9^{" * 20 + "9" + "}" * 20 + "}",
    ],
    ids=["tower", "factorial", "100k-chars", "5k-nested-braces", "nested-fracs", "megabyte"],
)
def test_pathological_inputs_end_within_bound(verifier: MathVerifier, response: str) -> None:
    started = time.monotonic()
    result = verifier.verify(response, "1", timeout_s=HANG_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert result.status in GAVE_UP, result
    assert elapsed < HANG_BOUND_S
    assert verifier.verify("\\boxed{2}", "2").status is Status.CORRECT


def test_timeout_reports_status_and_pool_keeps_serving(verifier: MathVerifier) -> None:
    result = verifier.verify("\\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=HANG_TIMEOUT_S)
    assert result.status is Status.TIMEOUT
    assert result.score == 0.0
    assert verifier.verify("\\boxed{\\frac{2}{4}}", "0.5").status is Status.CORRECT


def test_frozen_worker_is_killed_and_replaced(verifier: MathVerifier) -> None:
    """SIGSTOP defeats the worker's own timer, so only the parent's hard deadline can end the item."""
    frozen = verifier.worker_pids()
    assert len(frozen) == 2
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = verifier.verify("\\boxed{2}", "2", timeout_s=HANG_TIMEOUT_S)
        assert time.monotonic() - started < HANG_BOUND_S
        assert result.status is Status.TIMEOUT
        assert "killed" in result.detail
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert wait_for(lambda: len(verifier.worker_pids()) == 2 and set(verifier.worker_pids()) != set(frozen))
    assert verifier.verify("\\boxed{2}", "2").status is Status.CORRECT


def test_worker_killed_from_outside_is_replaced(verifier: MathVerifier) -> None:
    restarts = verifier.worker_restarts
    victim = verifier.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in verifier.worker_pids() and len(verifier.worker_pids()) == 2)
    assert verifier.worker_restarts == restarts + 1
    results = [verifier.verify(f"\\boxed{{{n}}}", str(n)) for n in range(4)]
    assert all(result.status is Status.CORRECT for result in results)


def test_worker_dying_mid_item_is_an_error_not_a_wrong_answer(verifier: MathVerifier) -> None:
    pending = verifier.submit("\\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=30.0)
    time.sleep(0.5)  # let a worker take the item (both are idle, so either may)
    victims = verifier.worker_pids()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    result = pending.result(timeout=30)
    assert result.status is Status.ERROR
    assert result.status.is_infrastructure_failure
    assert wait_for(lambda: len(verifier.worker_pids()) == 2 and not set(verifier.worker_pids()) & set(victims))
    assert verifier.verify("\\boxed{-7}", "-7").status is Status.CORRECT


# ---------------------------------------- concurrency


def test_submission_from_many_threads(verifier: MathVerifier) -> None:
    results: dict[int, Status] = {}

    def work(n: int) -> None:
        results[n] = verifier.verify(f"\\boxed{{{n}/2}}", str(n / 2)).status

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {n: Status.CORRECT for n in range(16)}


async def test_averify(verifier: MathVerifier) -> None:
    correct, wrong = await asyncio.gather(
        verifier.averify("\\boxed{2.0}", "\\sqrt{4}"), verifier.averify("\\boxed{\\sqrt{5}}", "2")
    )
    assert (correct.status, wrong.status) == (Status.CORRECT, Status.WRONG)


def test_full_queue_and_close() -> None:
    pool = MathVerifier(num_workers=1, max_pending=1, start_timeout_s=120)
    try:
        # The slot takes no job before its worker is ready, so the second one finds the queue full.
        first = pool.submit("\\boxed{1}", "1")
        with pytest.raises(queue.Full):
            pool.submit("\\boxed{1}", "1", block=False)
        assert first.result(timeout=120).status is Status.CORRECT
    finally:
        pool.close()
    assert pool.worker_pids() == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit("\\boxed{1}", "1")


def test_close_fails_queued_items_with_error() -> None:
    pool = MathVerifier(num_workers=1)
    futures = [pool.submit(f"\\boxed{{{n}}}", str(n)) for n in range(5)]
    pool.close()
    statuses = [future.result(timeout=30).status for future in futures]
    assert set(statuses) <= {Status.CORRECT, Status.ERROR}
    assert Status.ERROR in statuses  # the worker was still warming up, so at least the last item never ran
