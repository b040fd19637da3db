"""Function-call verifier: parse the calls a model wrote and check them against BFCL ground truth.

Parsing never evaluates anything. Three syntaxes are read from the answer (the text after the last ``</think>``):

- ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen/Hermes), a JSON object or a list of them
  per block; ``arguments`` may also be a JSON-encoded string, ``parameters`` is accepted as its alias and an
  OpenAI-style ``{"function": {...}}`` wrapper is unwrapped;
- bare JSON of the same shapes, optionally inside a Markdown fence;
- Python call syntax such as ``[math.gcd(num1=12, num2=18), f(a="x")]``, read with ``ast.parse`` and a walker that
  accepts only literals (constants, lists, tuples, dicts, sets, a sign on a number) and dotted names as callees.
  Arguments are keyword-only, as BFCL's prompt asks: a positional argument is kept under the key ``*0``, ``*1``...,
  which no declared parameter can match, so the call is *wrong* (not unparsable: the syntax was fine).

Bounds checked before any parser runs: 64 KiB of answer text, bracket nesting of 32 (a linear scan, because
``ast.parse`` and ``json.loads`` recurse), 64 calls, integers below 2**63, finite floats.

Checking follows BFCL's AST checker (``bfcl_eval/eval_checker/ast_eval/ast_checker.py``), re-implemented:
names must match (dots and underscores are interchangeable, since BFCL renames ``a.b`` to ``a_b`` for models whose
tool API forbids dots); parameters required by the function doc must be present; a parameter unknown to the doc or
to the ground truth fails; types are strict except that an int is accepted for a float (also inside arrays); each
value must equal one of its acceptable values, where ``""`` marks the parameter optional and strings compare after
BFCL's standardisation; dicts and lists of dicts follow BFCL's per-key rules; parallel calls match in any order by a
one-to-one assignment (an exact bipartite matching, where BFCL assigns greedily). A call set must have exactly as
many calls as the ground truth. Where BFCL's type checker finds a ground-truth value of another type than the
declared one (a "variable"), a value of that type is compared as is, as BFCL does.

Categories: names containing ``irrelevance`` expect no call (no parsable call, unparsable text included, is correct,
as in BFCL); ``relevance`` expects any parsable call; every other category expects the ground-truth call set.
When a call is expected and none is found the status is ``no_answer``.

Partial credit (``partial_credit=True``) follows ToolRL (Qian et al., 2025): ``score = format + correctness``, with
``format = 1`` when the answer parsed and has the expected shape (at least one call when calls are expected),
else 0, and ``correctness = 6 * r_match / r_max - 3`` in [-3, 3], where for G expected and P predicted calls

- ``r_name = |names(G) ∩ names(P)| / |names(G) ∪ names(P)|`` over multisets of (canonical) names;
- for an expected call g and a predicted call p with the same name, ``s(g, p) = r_key + r_value`` where
  ``r_key = |K_g ∩ K_p| / |K_g ∪ K_p|``, ``K_p`` the predicted keys, ``K_g`` the keys the ground truth or doc makes
  mandatory plus the optional ground-truth keys that p supplies, and ``r_value`` the share of ``K_g`` whose value
  p supplies and passes the exact type and value check; ``s = 0`` across different names;
- ``r_match = r_name + max over one-to-one assignments of Σ s(g, p)`` and ``r_max = 1 + 2|G|``.

With no expected calls (irrelevance) correctness is +3 without a call and -3 with one; relevance is the reverse.
An exact match always scores 1 + 3 = 4. Without partial credit the score is 1.0 when correct, else 0.0.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from reward_service.verifiers.base import Question, Status, Verifier, VerifyResult
from reward_service.verifiers.function_call_worker import worker_main
from reward_service.verifiers.pool import PoolJob, WorkerPool
from services.config import RewardConfig

MAX_ANSWER_CHARS = 64 * 1024
MAX_NESTING = 32
MAX_CALLS = 64
MAX_ABS_INT = 2**63
MAX_NAME_CHARS = 256
MAX_EXTRACTED_CHARS = 2048

logger = logging.getLogger(__name__)
TIMEOUT_DETAIL = "function-call check exceeded its time bound"

_THINK_END = "</think>"
_THINK_START = "<think>"
_TAG_OPEN = "<tool_call>"
_TAG_CLOSE = "</tool_call>"
_PYTHON_CALL_START = re.compile(r"\(|[A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*\s*\(")
_STANDARDIZE_DROP = re.compile(r"[ ,./\-_*^]")
_PY_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,  # BFCL's mapping: "any" values are compared as strings
    # JSON-Schema spellings, so docs already converted for a chat template's ``tools=`` check the same way
    "object": dict,
    "number": float,
}


class CallParseError(ValueError):
    """The answer looks like a call attempt but cannot be parsed safely."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed call: the callee's name and its literal arguments."""

    name: str
    arguments: dict[str, Any]


# ---------------------------------------------------------------- parsing


def parse_tool_calls(response: str) -> list[ToolCall] | None:
    """Parse the calls in ``response``; None when it makes no call attempt, CallParseError when one fails."""
    body = _answer_region(response)
    if len(body) > MAX_ANSWER_CHARS:
        raise CallParseError(f"answer longer than {MAX_ANSWER_CHARS} characters")
    if _TAG_OPEN in body:
        return _parse_tagged(body)
    body = _strip_fence(body)
    if body.startswith("{"):
        return _calls_from_json(_load_json(body))
    if body.startswith("["):
        try:
            data = _load_json(body)
        except CallParseError:
            return _parse_python(body)
        return _calls_from_json(data)
    if _PYTHON_CALL_START.match(body):
        return _parse_python(body)
    return None


def _answer_region(response: str) -> str:
    end = response.rfind(_THINK_END)
    if end >= 0:
        return response[end + len(_THINK_END) :].strip()
    if _THINK_START in response:
        return ""  # the reasoning never closed, so there is no answer
    return response.strip()


def _strip_fence(text: str) -> str:
    if not text.startswith("```"):
        return text
    newline = text.find("\n")
    if newline < 0:
        return text
    inner = text[newline + 1 :].rstrip()
    if inner.endswith("```"):
        inner = inner[:-3]
    return inner.strip()


def _parse_tagged(body: str) -> list[ToolCall]:
    calls: list[ToolCall] = []
    start = body.find(_TAG_OPEN)
    while start >= 0:
        content_start = start + len(_TAG_OPEN)
        end = body.find(_TAG_CLOSE, content_start)
        # generation often stops right after the JSON, before the closing tag
        content = body[content_start:] if end < 0 else body[content_start:end]
        calls.extend(_calls_from_json(_load_json(_strip_fence(content.strip()))))
        if len(calls) > MAX_CALLS:
            raise CallParseError(f"more than {MAX_CALLS} calls")
        start = -1 if end < 0 else body.find(_TAG_OPEN, end + len(_TAG_CLOSE))
    return calls


def _check_nesting(text: str) -> None:
    # Counts brackets inside strings too: a rare false rejection, but no quoting rule can hide nesting from it.
    depth = 0
    for char in text:
        if char in "([{":
            depth += 1
            if depth > MAX_NESTING:
                raise CallParseError(f"brackets nested deeper than {MAX_NESTING}")
        elif char in ")]}":
            depth -= 1


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-+")) > 19:
        raise CallParseError("integer literal too large")
    value = int(digits)
    if abs(value) >= MAX_ABS_INT:
        raise CallParseError("integer literal too large")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CallParseError("non-finite number")
    return value


def _reject_constant(name: str) -> Any:
    raise CallParseError(f"non-finite number {name}")


def _load_json(text: str) -> Any:
    _check_nesting(text)
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_reject_constant)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CallParseError(f"invalid JSON: {exc}") from None


def _calls_from_json(data: Any) -> list[ToolCall]:
    items = data if isinstance(data, list) else [data]
    if len(items) > MAX_CALLS:
        raise CallParseError(f"more than {MAX_CALLS} calls")
    return [_call_from_json(item) for item in items]


def _call_from_json(item: Any) -> ToolCall:
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise CallParseError('a call must be an object with a string "name"')
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _load_json(arguments)
    if not isinstance(arguments, dict):
        raise CallParseError('"arguments" must be an object')
    return ToolCall(_checked_name(item["name"]), arguments)


def _checked_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_CHARS:
        raise CallParseError("empty or overlong function name")
    return name


def _parse_python(text: str) -> list[ToolCall]:
    _check_nesting(text)
    try:
        tree = ast.parse(text, mode="exec")
    # MemoryError: CPython's parser reports a too-deep expression (60,000 unary minuses) as out of memory
    except (SyntaxError, ValueError, RecursionError, OverflowError, MemoryError) as exc:
        raise CallParseError(f"invalid call syntax: {type(exc).__name__}") from None
    calls: list[ToolCall] = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr):
            raise CallParseError("only call expressions are allowed")
        node = statement.value
        items = node.elts if isinstance(node, ast.List | ast.Tuple) else [node]
        calls.extend(_python_call(item) for item in items)
        if len(calls) > MAX_CALLS:
            raise CallParseError(f"more than {MAX_CALLS} calls")
    return calls


def _python_call(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call):
        raise CallParseError(f"expected a call, found {type(node).__name__}")
    arguments: dict[str, Any] = {f"*{index}": _literal(arg, 1) for index, arg in enumerate(node.args)}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise CallParseError("** unpacking is not allowed")
        if keyword.arg in arguments:  # ast.parse accepts f(a=1, a=2); only compiling it would fail
            raise CallParseError(f"keyword argument {keyword.arg!r} repeated")
        arguments[keyword.arg] = _literal(keyword.value, 1)
    return ToolCall(_checked_name(_dotted_name(node.func)), arguments)


def _dotted_name(node: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise CallParseError("a callee must be a plain or dotted name")
    parts.append(node.id)
    return ".".join(reversed(parts))


def _literal(node: ast.expr, depth: int) -> Any:
    if depth > MAX_NESTING:
        raise CallParseError(f"values nested deeper than {MAX_NESTING}")
    if isinstance(node, ast.Constant):
        return _checked_constant(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
            number: int | float = operand.value  # type: ignore[assignment]  # narrowed by the check above
            return _checked_constant(-number if isinstance(node.op, ast.USub) else number)
    elif isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [_literal(element, depth + 1) for element in node.elts]
    elif isinstance(node, ast.Dict):
        result: dict[Any, Any] = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if not isinstance(key, ast.Constant):
                raise CallParseError("dict keys must be constants")
            result[_checked_constant(key.value)] = _literal(value, depth + 1)
        return result
    raise CallParseError(f"{type(node).__name__} is not a literal")


def _checked_constant(value: Any) -> Any:
    if value is None or type(value) in (str, bool):
        return value
    if type(value) is int:
        if abs(value) >= MAX_ABS_INT:
            raise CallParseError("integer literal too large")
        return value
    if type(value) is float:
        return _finite_float(repr(value))
    raise CallParseError(f"{type(value).__name__} constants are not allowed")


# ---------------------------------------------------------------- checking


def standardize_string(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lowercase, single quotes become double."""
    return _STANDARDIZE_DROP.sub("", text).lower().replace("'", '"')


def _canonical_name(name: str) -> str:
    return name.replace(".", "_")


def _options(acceptable: Any) -> list[Any]:
    return acceptable if isinstance(acceptable, list) else [acceptable]


def _is_marker(option: Any) -> bool:
    return isinstance(option, str) and option == ""


def _same(value: Any, answer: Any) -> bool:
    if isinstance(value, bool) or isinstance(answer, bool):
        return type(value) is bool and type(answer) is bool and value == answer
    if isinstance(answer, str):
        return isinstance(value, str) and standardize_string(value) == standardize_string(answer)
    if isinstance(answer, int | float):
        return isinstance(value, int | float) and value == answer
    if isinstance(answer, list):
        return isinstance(value, list) and len(value) == len(answer) and all(map(_same, value, answer))
    if isinstance(answer, dict):
        return (
            isinstance(value, dict)
            and value.keys() == answer.keys()
            and all(_same(value[k], answer[k]) for k in answer)
        )
    return value is None and answer is None


def _dict_matches(value: dict[str, Any], acceptable: dict[str, Any]) -> bool:
    for key, item in value.items():
        if key not in acceptable or not any(_same(item, o) for o in _options(acceptable[key]) if not _is_marker(o)):
            return False
    return all(key in value or "" in _options(options) for key, options in acceptable.items())


def _list_of_dicts_matches(value: list[Any], acceptable: Any) -> bool:
    return (
        isinstance(acceptable, list)
        and len(acceptable) == len(value)
        and all(
            isinstance(v, dict) and isinstance(a, dict) and _dict_matches(v, a)
            for v, a in zip(value, acceptable, strict=True)
        )
    )


def _item_types_ok(value: list[Any], schema: dict[str, Any], options: list[Any]) -> bool:
    # One level deep, as BFCL: an item passes with the declared item type or, like a "variable", with the type of
    # the items of some acceptable list.
    items = schema.get("items")
    expected = _PY_TYPES.get(items.get("type", "")) if isinstance(items, dict) else None
    if expected is None:
        return True
    for option in options:
        if not isinstance(option, list):
            return True
        answer_type = next((type(o) for o in option if not _is_marker(o)), None)
        if all(type(v) in (expected, answer_type) or (expected is float and type(v) is int) for v in value):
            return True
    return not options


def _check_value(key: str, value: Any, schema: dict[str, Any], acceptable: Any) -> str | None:
    """Why ``value`` fails for parameter ``key``, or None when it passes BFCL's type and value check."""
    declared = schema.get("type", "")
    if declared not in _PY_TYPES:
        raise ValueError(f"parameter {key!r} has unsupported type {declared!r}; expected one of {sorted(_PY_TYPES)}")
    expected = _PY_TYPES[declared]
    options = [o for o in _options(acceptable) if not _is_marker(o)]
    answer_type = type(options[0]) if options else None
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is expected:
        is_variable = answer_type is not None and answer_type is not expected
        if not is_variable and isinstance(value, list) and not _item_types_ok(value, schema, options):
            return f"wrong item type in {key!r}"
    elif answer_type is not None and type(value) is answer_type:
        is_variable = True
    else:
        return f"wrong type for {key!r}: {type(value).__name__}, expected {declared}"
    items = schema.get("items")
    if is_variable:
        matched = any(_same(value, o) for o in options)
    elif expected is dict:
        matched = any(isinstance(o, dict) and _dict_matches(value, o) for o in options)
    elif expected is list and isinstance(items, dict) and items.get("type") == "dict":
        matched = any(_list_of_dicts_matches(value, o) for o in options)
    else:
        matched = any(_same(value, o) for o in options)
    return None if matched else f"value of {key!r} is not acceptable: {_short(value)}"


def _check_call(call: ToolCall, name: str, acceptable: dict[str, Any], doc: dict[str, Any]) -> str | None:
    """Why ``call`` fails the expected call ``name(acceptable)``, or None when it matches."""
    if _canonical_name(call.name) != _canonical_name(name):
        return f"function {call.name!r} is not {name!r}"
    parameters = doc.get("parameters", {})
    properties = parameters.get("properties", {})
    for key in parameters.get("required", []):
        if key not in call.arguments:
            return f"missing required parameter {key!r}"
    for key, value in call.arguments.items():
        if key not in properties or key not in acceptable:
            return f"unexpected parameter {key!r}"
        error = _check_value(key, value, properties[key], acceptable[key])
        if error is not None:
            return error
    for key, options in acceptable.items():
        if key not in call.arguments and "" not in _options(options):
            return f"missing parameter {key!r}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _max_assignment(weights: list[list[float]]) -> float:
    """Largest total weight of a one-to-one assignment of rows to columns (Hungarian algorithm)."""
    if not weights or not weights[0]:
        return 0.0
    if len(weights) > len(weights[0]):
        weights = [list(column) for column in zip(*weights, strict=True)]
    rows, cols = len(weights), len(weights[0])
    row_pot, col_pot = [0.0] * (rows + 1), [0.0] * (cols + 1)
    owner, way = [0] * (cols + 1), [0] * (cols + 1)
    for row in range(1, rows + 1):
        owner[0], col0 = row, 0
        slack, used = [math.inf] * (cols + 1), [False] * (cols + 1)
        while owner[col0] != 0:
            used[col0] = True
            row0, delta, col1 = owner[col0], math.inf, 0
            for col in range(1, cols + 1):
                if not used[col]:
                    cost = -weights[row0 - 1][col - 1] - row_pot[row0] - col_pot[col]
                    if cost < slack[col]:
                        slack[col], way[col] = cost, col0
                    if slack[col] < delta:
                        delta, col1 = slack[col], col
            for col in range(cols + 1):
                if used[col]:
                    row_pot[owner[col]] += delta
                    col_pot[col] -= delta
                else:
                    slack[col] -= delta
            col0 = col1
        while col0:
            col1 = way[col0]
            owner[col0] = owner[col1]
            col0 = col1
    return sum(weights[owner[col] - 1][col - 1] for col in range(1, cols + 1) if owner[col])


@dataclass(frozen=True, slots=True)
class _Expected:
    name: str
    acceptable: dict[str, Any]
    doc: dict[str, Any]


def _expected_calls(functions: list[dict[str, Any]], ground_truth: list[dict[str, Any]]) -> list[_Expected]:
    docs = {doc["name"]: doc for doc in functions}
    canonical_docs = {_canonical_name(doc["name"]): doc for doc in functions}
    expected = []
    for entry in ground_truth:
        if len(entry) != 1:
            raise ValueError(f"a ground-truth entry must map one function name to its parameters, got {entry!r}")
        ((name, acceptable),) = entry.items()
        doc = docs.get(name) or canonical_docs.get(_canonical_name(name))
        if doc is None:
            raise ValueError(f"ground-truth function {name!r} is not among the functions given")
        expected.append(_Expected(name, acceptable, doc))
    return expected


def _exact_mismatch(calls: list[ToolCall], expected: list[_Expected]) -> str | None:
    if len(calls) != len(expected):
        return f"expected {len(expected)} call(s), got {len(calls)}"
    errors = [[_check_call(call, e.name, e.acceptable, e.doc) for call in calls] for e in expected]
    if _max_assignment([[1.0 if error is None else 0.0 for error in row] for row in errors]) > len(expected) - 0.5:
        return None
    if len(expected) == 1:
        return errors[0][0]
    first = next(error for row in errors for error in row if error is not None)
    return f"no one-to-one match of the calls; e.g. {first}"


def _pair_score(call: ToolCall, expected: _Expected) -> float:
    if _canonical_name(call.name) != _canonical_name(expected.name):
        return 0.0
    required = set(expected.doc.get("parameters", {}).get("required", []))
    predicted = set(call.arguments)
    wanted = {k for k, o in expected.acceptable.items() if "" not in _options(o) or k in predicted} | required
    union = wanted | predicted
    r_key = len(wanted & predicted) / len(union) if union else 1.0
    properties = expected.doc.get("parameters", {}).get("properties", {})
    passed = sum(
        1
        for k in wanted & predicted
        if k in properties
        and k in expected.acceptable
        and _check_value(k, call.arguments[k], properties[k], expected.acceptable[k]) is None
    )
    r_value = passed / len(wanted) if wanted else 1.0
    return r_key + r_value


def _partial_correctness(calls: list[ToolCall], expected: list[_Expected]) -> float:
    names_expected = Counter(_canonical_name(e.name) for e in expected)
    names_predicted = Counter(_canonical_name(call.name) for call in calls)
    union = sum((names_expected | names_predicted).values())
    r_name = sum((names_expected & names_predicted).values()) / union if union else 1.0
    r_pairs = _max_assignment([[_pair_score(call, e) for call in calls] for e in expected])
    return 6.0 * (r_name + r_pairs) / (1 + 2 * len(expected)) - 3.0


# ---------------------------------------------------------------- entry point


def _extracted(calls: list[ToolCall] | None) -> str | None:
    if calls is None:
        return None
    text = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False, default=str)
    return text if len(text) <= MAX_EXTRACTED_CHARS else text[: MAX_EXTRACTED_CHARS - 3] + "..."


def verify_function_call(
    response: str,
    functions: list[dict[str, Any]],
    ground_truth: list[dict[str, Any]] | None,
    category: str,
    *,
    partial_credit: bool = False,
) -> VerifyResult:
    """Verify the calls in ``response`` against BFCL ground truth for ``category`` (see the module docstring)."""
    if "java" in category:
        raise ValueError(f"category {category!r} uses Java/JavaScript types; only Python-typed ones are supported")
    parse_error: str | None = None
    try:
        calls = parse_tool_calls(response)
    except CallParseError as exc:
        calls, parse_error = None, str(exc)
    made_calls = bool(calls)
    extracted = _extracted(calls)

    if "irrelevance" in category:
        status = Status.WRONG if made_calls else Status.CORRECT
        detail = "a call was made where none is expected" if made_calls else (parse_error or "")
        correctness = -3.0 if made_calls else 3.0
        return _result(status, partial_credit, parse_error is None, correctness, extracted, detail)
    if parse_error is not None:
        return _result(Status.UNPARSABLE, partial_credit, False, -3.0, None, parse_error)
    if not made_calls:
        return _result(Status.NO_ANSWER, partial_credit, False, -3.0, extracted, "no call found")
    assert calls is not None
    if "relevance" in category:
        return _result(Status.CORRECT, partial_credit, True, 3.0, extracted, "")
    if ground_truth is None:
        raise ValueError(f"category {category!r} needs ground truth")
    expected = _expected_calls(functions, ground_truth)
    mismatch = _exact_mismatch(calls, expected)
    if mismatch is None:
        return _result(Status.CORRECT, partial_credit, True, 3.0, extracted, "")
    correctness = _partial_correctness(calls, expected) if partial_credit else -3.0
    return _result(Status.WRONG, partial_credit, True, correctness, extracted, mismatch)


def _result(
    status: Status, partial_credit: bool, format_ok: bool, correctness: float, extracted: str | None, detail: str
) -> VerifyResult:
    if partial_credit:
        score = (1.0 if format_ok else 0.0) + correctness
    else:
        score = 1.0 if status is Status.CORRECT else 0.0
    return VerifyResult(status=status, score=score, extracted=extracted, detail=detail)


# ---------------------------------------------------------------- the verifier


def question_calls(question: Question) -> list[dict[str, Any]]:
    """The acceptable call set of a function-call question; ValueError when it is not one."""
    truth: Any = question.ground_truth
    if isinstance(truth, str):
        try:
            truth = json.loads(truth) if truth else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"function-call ground truth is not JSON: {exc.msg}") from exc
    if not isinstance(truth, list):
        raise ValueError(f"a function-call question needs a list ground truth, got {type(truth).__name__}")
    return truth


class FunctionCallVerifier(Verifier):
    """Checks calls in a pool of killable worker processes (``reward_service.verifiers.pool``): parsing is bounded
    by construction (size and depth caps), but a check's cost grows with what the caller sends, so a check still
    running at its deadline ends as ``timeout`` and, past the kill grace, its worker is killed and replaced."""

    def __init__(
        self,
        *,
        partial_credit: bool = False,
        workers: int = 2,
        start_method: Literal["forkserver", "spawn"] = "forkserver",
        memory_limit_mb: int = 1024,
    ) -> None:
        self.partial_credit = partial_credit
        preload = ["reward_service.verifiers.function_call"]
        self._pool = WorkerPool("function-call", worker_main, (memory_limit_mb,), num_workers=max(1, workers),
                                start_method=start_method, preload=preload)  # fmt: skip

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> FunctionCallVerifier:
        """One replica's verifier: its partial-credit rule and as many processes as verifier workers."""
        return cls(partial_credit=cfg.function_call_partial_credit, workers=cfg.verifier_workers)

    @classmethod
    def validate_question(cls, question: Question) -> None:
        """A question needs a list of acceptable calls and a Python-typed category."""
        if "java" in question.category:
            raise ValueError(
                f"category {question.category!r} uses Java/JavaScript types, which the function-call verifier does "
                "not check; use Python-typed categories only"
            )
        question_calls(question)

    def check(self, response: str, question: Question, timeout_s: float) -> Future[VerifyResult]:
        """Queue one check; the future resolves with ``timeout`` when it outlives ``timeout_s``."""
        truth = question_calls(question)
        fields = (response, json.dumps(list(question.tools)), json.dumps(truth), question.category or "simple_python",
                  1.0 if self.partial_credit else 0.0, timeout_s)  # fmt: skip

        def decode(reply: list[Any]) -> VerifyResult:
            status, score, extracted, detail = reply
            return VerifyResult(Status(str(status)), float(score), None if extracted is None else str(extracted),
                                str(detail))  # fmt: skip

        def failed(status: Status, detail: str) -> VerifyResult:
            return VerifyResult(status, 0.0, None, TIMEOUT_DETAIL if status is Status.TIMEOUT else detail)

        return self._pool.submit(PoolJob(fields, timeout_s, Future(), decode, failed))

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the worker processes are up; True when all are."""
        return self._pool.wait_ready(timeout_s)

    @property
    def worker_restarts(self) -> int:
        """Workers started beyond the initial ones (kills, crashes)."""
        return self._pool.worker_restarts

    def worker_pids(self) -> list[int]:
        """Process ids of the workers that are currently ready."""
        return self._pool.worker_pids()

    def close(self) -> None:
        """Stop the workers (asking first, then SIGKILL); checks still queued resolve as ``error``."""
        self._pool.close()
