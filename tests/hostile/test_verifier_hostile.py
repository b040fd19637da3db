"""Hostile model outputs fed to both verifiers: every answer is a status, nothing is executed, time and memory bound.

A policy under RL optimises against its verifier, so whatever text it can produce will eventually reach it:
answers that would run code if anything evaluated them, numbers too large to ever compute (``9**9**9``,
``10^{10^{10}}``), nesting and braces that defeat recursive parsers, megabyte strings and LaTeX macro bombs. Each
goes through the reward service's own ``Verifiers`` (math in its killable process pool, function calls on a
thread) with a 1-second budget. Expected: a :class:`Status` (correct, wrong, no_answer, unparsable, timeout, error),
never an exception; the files the payloads would create never appear; and the pool still answers a plain item
correctly afterwards. The unit tests of each verifier hold the common pathological cases; this file adds
code-execution payloads, hypothesis-generated LaTeX and call syntax, and the service-level path.

The bound on each item is a correctness bound, not a speed target: without the timeout machinery these items run
for minutes or forever, while with it they end within the budget plus the kill grace.
"""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_service.verifiers.base import Status, VerifyResult
from reward_service.verifiers.function_call import MAX_ANSWER_CHARS, parse_tool_calls, verify_function_call
from reward_service.verifiers.math import MathVerifyOptions, extract_answer
from reward_service.verify import Verifiers
from services.config import RewardConfig
from services.protocol import PromptTask, Sampling

pytestmark = pytest.mark.timeout(180)

BUDGET_S = 1.0
BOUND_S = 60.0
"""Generous: budget + kill grace + a loaded 2-core machine; a hang would exceed it by orders of magnitude."""
STATUSES = set(Status)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOOL = {
    "name": "calc",
    "description": "Adds.",
    "parameters": {
        "type": "dict",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "array"}},
        "required": ["a"],
    },
}
TRUTH = [{"calc": {"a": [1], "b": ["x", ""], "c": [[1, 2], ""]}}]


@pytest.fixture(scope="module")
def verifiers() -> Iterator[Verifiers]:
    pool = Verifiers(RewardConfig(verifier_workers=2, verify_timeout_s=BUDGET_S))
    assert pool.wait_ready(120), "math workers did not warm up"
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file that only an executed payload would create."""
    return tmp_path_factory.mktemp("hostile") / "pwned"


def math_task(gold: str) -> PromptTask:
    return PromptTask("m", "math", [{"role": "user", "content": "?"}], gold, 1, Sampling())


def call_task(category: str = "simple_python") -> PromptTask:
    return PromptTask("f", "function_call", [{"role": "user", "content": "?"}], TRUTH, 1, Sampling(),
                      tools=[TOOL], category=category)  # fmt: skip


async def verify_all(verifiers: Verifiers, task: PromptTask, responses: list[str]) -> list[VerifyResult]:
    """Verify every response concurrently, each within BOUND_S."""
    return list(await asyncio.gather(*(asyncio.wait_for(verifiers.verify(task, r), BOUND_S) for r in responses)))


def check(results: list[VerifyResult], responses: list[str]) -> None:
    for response, result in zip(responses, results, strict=True):
        assert isinstance(result, VerifyResult) and result.status in STATUSES, response[:120]
        assert result.status is not Status.CORRECT, (response[:120], result)
        assert result.score == 0.0


# ------------------------------------------------------------------------------------------------ math


def math_payloads(marker: Path) -> list[str]:
    """Outputs a math verifier must survive; none is correct for the gold answer 7."""
    touch = f"__import__('os').system('touch {marker}')"
    return [
        # code, in every place an answer can come from
        f"\\boxed{{{touch}}}",
        f"\\boxed{{\\text{{{touch}}}}}",
        f"Answer: {touch}",
        f"#### {touch}",
        f"\\boxed{{eval(\"open('{marker}', 'w')\")}}",
        f"\\boxed{{exec(compile('open(\"{marker}\",\"w\")', 'x', 'exec'))}}",
        f"\\boxed{{(lambda: {touch})()}}",
        "\\boxed{().__class__.__bases__[0].__subclasses__()}",
        f"\\boxed{{\\def\\x{{{touch}}}\\x}}",
        # numbers that cannot be computed
        "\\boxed{9**9**9}",
        "\\boxed{9**9**9**9}",
        "Answer: 9**9**9**9",
        "#### 10**10**10",
        "\\boxed{10^10^10}",
        "\\boxed{10^{10^{10^{10}}}}",
        "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
        "\\boxed{(10^{100})!}",
        "\\boxed{10!!!!!!!!!!!!!!!!}",
        "\\boxed{\\binom{10^{10}}{10^{5}}}",
        "\\boxed{\\sum_{k=1}^{10^{100}} k^{k}}",
        "\\boxed{\\prod_{k=1}^{10^{9}} k}",
        "\\boxed{\\int_0^{10^{10}} e^{x^{x}}\\,dx}",
        "\\boxed{1" + "0" * 999 + "}",
        # nesting, unbalanced braces
        "\\boxed{" * 50_000 + "1" + "}" * 50_000,
        "\\boxed{" * 50_000 + "1",
        "}" * 10_000 + "\\boxed{1}}}}}}",
        "\\boxed{\\left(" * 40 + "1" + "\\right)" * 40 + "}",
        "\\boxed{\\sqrt{" * 60 + "2" + "}" * 60 + "}",
        "\\boxed{" + "{[(" * 30 + "1" + ")]}" * 30 + "}",
        # megabyte strings
        "\\boxed{" + "1" * 1_000_000 + "}",
        "Answer: " + "9" * 2_000_000,
        "#### " + "x" * 3_000_000,
        "\\boxed" * 300_000,
        "\\\\boxed{" * 200_000 + "1}",
        # LaTeX bombs and oddities
        "\\def\\a{\\a\\a}\\boxed{\\a}",
        "\\newcommand{\\x}{\\x\\x}\\boxed{\\x}",
        "\\boxed{\\begin{matrix}" + "1&" * 300 + "1\\end{matrix}}",
        "\\boxed{\\frac{\\frac{\\frac{\\frac{1}{0}}{0}}{0}}{0}}",
        "\\boxed{0/0}",
        "\\boxed{\\infty - \\infty}",
        "\\boxed{\x00\x01\x02}",
        "\\boxed{\u202e1\u202c}",
        "\\boxed{\ud800}",
        "\\boxed{\U0001f4a3}",
        "$" * 100_000,
    ]


async def test_math_hostile_outputs_end_in_a_status_and_run_nothing(verifiers: Verifiers, marker: Path) -> None:
    responses = math_payloads(marker)
    results = await verify_all(verifiers, math_task("7"), responses)
    check(results, responses)
    assert not marker.exists(), "a payload was executed"
    plain = await verifiers.verify(math_task("7"), "\\boxed{7}")
    assert plain.status is Status.CORRECT  # the pool survived every one of them


async def test_hostile_gold_answers_end_in_a_status(verifiers: Verifiers, marker: Path) -> None:
    """A poisoned dataset is hostile too: golds go through the same parser."""
    golds = ["9**9**9**9", "\\boxed{" * 5000, "}" * 5000, f"__import__('os').system('touch {marker}')",
             "1" * 100_000, "\\def\\a{\\a\\a}\\a", ""]  # fmt: skip
    results = await asyncio.gather(
        *(asyncio.wait_for(verifiers.verify(math_task(gold), "\\boxed{2}"), BOUND_S) for gold in golds)
    )
    check(list(results), golds)
    assert not marker.exists()


latex_soup = st.lists(
    st.sampled_from(
        ["\\boxed{", "\\fbox{", "{", "}", "\\{", "\\}", "\\\\", "\\", "^", "_", "9", "10", "**", "!", "(", ")",
         "[", "]", "\\frac", "\\sqrt", "\\left(", "\\right)", "$", "$$", "Answer:", "answer:", "####", "\n", " ",
         "x", "=", "\\text{", "\\def", "__import__('os')", ".", ",", "%", "\\infty", "e", "\\pi", "-", "+", "/"]
    )
    | st.text(max_size=4),
    max_size=80,
).map("".join)  # fmt: skip


@FUZZ
@given(response=latex_soup)
def test_fuzzed_latex_extraction_never_raises(response: str) -> None:
    found = extract_answer(response)
    if found.answer is not None:
        assert found.answer and found.answer in response
    else:
        assert found.problem


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=latex_soup, gold=st.sampled_from(["1", "\\frac{1}{2}", "x^2", "\\{1,2\\}"]))
def test_fuzzed_latex_through_the_pool_is_a_status(verifiers: Verifiers, response: str, gold: str) -> None:
    started = time.monotonic()
    result = verifiers.get("math").verify(response, gold, timeout_s=BUDGET_S)
    assert result.status in STATUSES
    assert time.monotonic() - started < BOUND_S


@pytest.mark.parametrize(
    "response",
    ["\\boxed{" + "{" * 4_000_000, "x" * 4_000_000 + "\\boxed{1}", "Answer:" + "$" * 4_000_000, "\\boxed" * 700_000],
    ids=["braces", "tail-box", "dollars", "markers"],
)
def test_extraction_memory_does_not_grow_with_the_input(response: str) -> None:
    """Only the last max_response_chars characters are scanned: a 4 MB output costs a fraction of that."""
    options = MathVerifyOptions()
    tracemalloc.start()
    try:
        extract_answer(response, options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(response) >= 4_000_000
    assert peak < 10 * options.max_response_chars, f"peak {peak} bytes for a {len(response)}-character output"


# ------------------------------------------------------------------------------------------------ function calls


def call_payloads(marker: Path) -> list[str]:
    """Outputs the function-call verifier must read without running; none is a correct call of ``calc``."""
    touch = f"__import__('os').system('touch {marker}')"
    path_touch = f"__import__('pathlib').Path('{marker}').touch()"
    return [
        f"calc(a={path_touch})",
        f"calc(a=(x := {path_touch}))",
        f"calc(a=open('{marker}', 'w'))",
        f"calc(a=exec(\"open('{marker}', 'w')\"))",
        f'calc(a=eval("{touch}"))',
        f"calc(a=compile('{touch}', 'x', 'exec'))",
        f"calc(a=globals()['__builtins__'].exec('{touch}'))",
        f"calc(a=print('{marker}'))",
        f"calc(a=[{touch} for _ in range(10**9)])",
        f"calc(a={{k: {touch} for k in 'ab'}})",
        f"calc(a=({touch} for _ in 'a'))",
        f"calc(a=1 if {touch} else 2)",
        f"calc(a=f'{{{touch}}}')",
        "calc(a='x' * 10**12)",
        "calc(a=(1,) * 10**12)",
        "calc(a=1, b='%s' % __import__('os').getcwd())",
        "calc(a=__builtins__)",
        "calc(a=__import__)",
        "calc(a=calc)",
        "calc(a=[1][0])",
        "calc(a=~1)",
        "calc(a=-True)",
        "calc(a=1, a=1)",
        f"@{touch}\ndef calc(): pass",
        f"class C:\n    x = {touch}",
        f"import os; os.system('touch {marker}')",
        f"calc(a=1)\n{touch}",
        f"calc(a=1); {path_touch}",
        f"lambda: {touch}",
        f"await {touch}",
        f"yield {touch}",
        f"calc(a=1)[{touch}]",
        f"calc(a=1).__class__({touch})",
        f"{touch}.calc(a=1)",
        f"calc(**{{'a': {touch}}})",
        f"calc(*[{touch}])",
        # JSON and tags
        f'{{"name": "calc", "arguments": {{"a": "{touch}"}}}}',
        f'{{"name": "{touch}", "arguments": {{"a": 1}}}}',
        '{"name": "calc", "arguments": "{\\"a\\": \\"{\\\\\\"a\\\\\\": 1}\\"}"}',
        '{"name": "calc", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}",
        '{"name": "calc", "arguments": {"a": [' + ",".join(["1"] * 20_000) + "]}}",
        '{"name": "calc", "arguments": {"a": 1' + "0" * 400 + "}}",
        '{"name": "calc", "arguments": {"a": 1e400}}',
        '{"name": "calc", "arguments": {"a": -Infinity}}',
        '{"name": "calc", "arguments": {"a": 1, "a": 2, "b": "\\ud800"}}',
        '<tool_call>{"name": "calc", "arguments": {"a": 1}}</tool_call>' * 100,
        "<tool_call>" * 10_000,
        "<think>" + "calc(a=1)",
        "</think>" * 10_000 + "calc(a=",
        "```python\n" + f"calc(a={touch})\n```",
        "\x00calc(a=1)",
        "ｃａｌｃ(a=1)",
        "calc(a=1" + ")" * 100_000,
        "calc(" * 100_000,
        "[" + "calc(a=1), " * 10_000 + "]",
        "c" * (MAX_ANSWER_CHARS + 1) + "(a=1)",
    ]


async def test_function_call_hostile_outputs_end_in_a_status_and_run_nothing(
    verifiers: Verifiers, marker: Path
) -> None:
    responses = call_payloads(marker)
    results = await verify_all(verifiers, call_task(), responses)
    check(results, responses)
    for category in ("irrelevance", "relevance", "parallel_multiple"):  # every checking path
        for response in responses:
            result = verify_function_call(response, [TOOL], TRUTH, category)
            assert result.status in STATUSES
    assert not marker.exists(), "a payload was executed"
    assert (await verifiers.verify(call_task(), "calc(a=1, b='x', c=[1, 2])")).status is Status.CORRECT


def _expression(atoms: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Python expressions built from ``atoms``: calls, attributes, subscripts, operators, containers, lambdas."""

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        pair = st.tuples(inner, inner)
        return st.one_of(
            pair.map(lambda p: f"{p[0]}({p[1]})"),
            pair.map(lambda p: f"{p[0]}.{p[1]}" if p[1].isidentifier() else f"{p[0]}.x"),
            pair.map(lambda p: f"{p[0]}[{p[1]}]"),
            st.tuples(inner, st.sampled_from(["+", "*", "**", "-", "%", "//", "and", "if 1 else"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            ),
            st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
            st.lists(inner, max_size=3).map(lambda xs: "(" + ", ".join(xs) + ",)"),
            st.lists(pair, max_size=2).map(lambda ps: "{" + ", ".join(f"{k}: {v}" for k, v in ps) + "}"),
            inner.map(lambda x: f"(lambda: {x})"),
            inner.map(lambda x: f"-{x}"),
            inner.map(lambda x: f"[{x} for _ in range(3)]"),
            inner.map(lambda x: f"f'{{{x}}}'"),
        )

    return st.recursive(atoms, extend, max_leaves=12)


call_atoms = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6).map(repr),
    st.sampled_from(["None", "True", "x", "os", "__import__", "__builtins__", "calc", "globals()", "...",
                     "__import__('pathlib').Path(MARKER).touch()", "open(MARKER, 'w')", "10**10**10", "9**9**9"]),
)  # fmt: skip
call_expressions = _expression(call_atoms)  # built once: a recursive strategy is costly to validate


@FUZZ
@given(
    expression=call_expressions,
    shape=st.sampled_from(["calc(a={})", "calc(a=1, c={})", "{}", "[calc(a={}), calc(a=1)]"]),
)
def test_fuzzed_call_syntax_is_read_never_run(expression: str, shape: str, marker: Path) -> None:
    response = shape.format(expression.replace("MARKER", repr(str(marker))))
    result = verify_function_call(response, [TOOL], TRUTH, "simple_python")
    assert result.status in STATUSES
    if result.status is Status.CORRECT:  # only a literal call equal to the ground truth may pass
        assert parse_tool_calls(response) is not None
    assert not marker.exists(), response


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=30,
)


@FUZZ
@given(
    arguments=json_values,
    name=st.sampled_from(["calc", "", "c" * 300, "__import__"]) | st.text(max_size=8),
    tagged=st.booleans(),
    as_string=st.booleans(),
)
def test_fuzzed_json_calls_end_in_a_status(arguments: Any, name: str, tagged: bool, as_string: bool) -> None:
    call = {"name": name, "arguments": json.dumps(arguments) if as_string else arguments}
    text = json.dumps(call)
    response = f"<tool_call>{text}</tool_call>" if tagged else text
    result = verify_function_call(response, [TOOL], TRUTH, "simple_python")
    assert result.status in STATUSES
    expected = isinstance(arguments, dict) and name == "calc" and arguments.get("a") == 1
    if result.status is Status.CORRECT:
        assert expected, (response, result)
