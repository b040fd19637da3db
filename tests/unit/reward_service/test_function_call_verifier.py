"""Function-call verifier on real BFCL v4 items: outputs built from the ground truth, perturbations, hostile input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from reward_service.verifiers.base import Status
from reward_service.verifiers.function_call import (
    MAX_ANSWER_CHARS,
    CallParseError,
    FunctionCallVerifier,
    ToolCall,
    parse_tool_calls,
    standardize_string,
    verify_function_call,
)
from services.bfcl import BfclItem, load_bfcl

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple")
ITEMS_PER_CATEGORY = 25
SYNTAXES = ("tool_call", "json", "python")

Call = tuple[str, dict[str, Any]]


# ---------------------------------------------------------------- building answers from the ground truth


def _first(options: list[Any]) -> Any:
    return next(o for o in options if o != "")


def _pick_dict(acceptable: dict[str, list[Any]], full: bool) -> dict[str, Any]:
    return {k: _first(v) for k, v in acceptable.items() if "" not in v or (full and any(o != "" for o in v))}


def _pick(options: list[Any], schema: dict[str, Any], full: bool) -> Any:
    value = _first(options)
    items = schema.get("items", {})
    if schema.get("type") == "dict" and isinstance(value, dict):
        return _pick_dict(value, full)
    if schema.get("type") == "array" and items.get("type") == "dict" and isinstance(value, list):
        return [_pick_dict(element, full) for element in value]
    return value


def ground_truth_calls(item: BfclItem, full: bool = False) -> list[Call] | None:
    """The ground truth's first acceptable call set (None when BFCL's data makes it unsolvable)."""
    assert item.ground_truth is not None
    docs = {doc["name"]: doc for doc in item.functions}
    calls: list[Call] = []
    for entry in item.ground_truth:
        ((name, acceptable),) = entry.items()
        parameters = docs[name]["parameters"]
        required = set(parameters.get("required", []))
        arguments = {}
        for key, options in acceptable.items():
            has_value = any(o != "" for o in options)
            optional = "" in options and key not in required
            if optional and not (full and has_value and key in parameters["properties"]):
                continue
            if not has_value or key not in parameters["properties"]:
                return None
            arguments[key] = _pick(options, parameters["properties"][key], full)
        if not required <= arguments.keys():
            return None
        calls.append((name, arguments))
    return calls


def render(calls: list[Call], syntax: str) -> str:
    """Write ``calls`` the way a model would in one of the three syntaxes."""
    if syntax == "tool_call":
        blocks = (json.dumps({"name": name, "arguments": args}) for name, args in calls)
        return "<think>\nLet me call the tools.\n</think>\n\n" + "\n".join(
            f"<tool_call>\n{b}\n</tool_call>" for b in blocks
        )
    if syntax == "json":
        return json.dumps([{"name": name, "arguments": args} for name, args in calls])
    rendered = (f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls)
    return f"[{', '.join(rendered)}]"


def _cases(categories: tuple[str, ...]) -> list[tuple[BfclItem, list[Call]]]:
    cases = []
    for category in categories:
        items = load_bfcl(category, limit=ITEMS_PER_CATEGORY)
        solvable = [(item, calls) for item in items if (calls := ground_truth_calls(item)) is not None]
        # a few BFCL items have empty acceptable lists; most must remain
        assert len(solvable) >= ITEMS_PER_CATEGORY - 3, category
        cases.extend(solvable)
    return cases


CASES = _cases(AST_CATEGORIES)
CASE_IDS = [item.id for item, _ in CASES]


def _verify(item: BfclItem, response: str, **kwargs: Any) -> Status:
    return verify_function_call(response, item.functions, item.ground_truth, item.category, **kwargs).status


# ---------------------------------------------------------------- loader


def test_loader_reads_every_category_with_its_shape() -> None:
    for category in (*AST_CATEGORIES, "irrelevance"):
        items = load_bfcl(category, limit=5)
        assert len(items) == 5
        for item in items:
            assert item.category == category
            assert item.id.startswith(category)
            assert item.messages and all({"role", "content"} <= m.keys() for m in item.messages)
            assert item.functions and all("name" in f and "parameters" in f for f in item.functions)
            assert (item.ground_truth == []) == (category == "irrelevance")


def test_loader_limit_and_errors() -> None:
    assert len(load_bfcl("parallel", limit=0)) == 0
    assert len(load_bfcl("live_parallel")) == 16
    with pytest.raises(ValueError, match="unknown BFCL category"):
        load_bfcl("multi_turn_base")


def test_loader_does_not_import_bfcl_eval() -> None:
    # bfcl_eval's own modules pull heavy dependencies and its decoders eval model output: only its data is read
    code = "import sys; from services.bfcl import load_bfcl; load_bfcl('parallel', 2); "
    code += "assert not any(m.startswith('bfcl_eval') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- ground truth passes


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize(("item", "calls"), CASES, ids=CASE_IDS)
def test_ground_truth_passes(item: BfclItem, calls: list[Call], syntax: str) -> None:
    result = verify_function_call(render(calls, syntax), item.functions, item.ground_truth, item.category)
    assert result.status is Status.CORRECT, result.detail
    assert result.score == 1.0
    assert result.extracted is not None and calls[0][0] in result.extracted


@pytest.mark.parametrize(("item", "calls"), CASES, ids=CASE_IDS)
def test_ground_truth_with_optional_values_and_reversed_order_passes(item: BfclItem, calls: list[Call]) -> None:
    full = ground_truth_calls(item, full=True)
    assert full is not None
    assert _verify(item, render(full[::-1], "python")) is Status.CORRECT
    assert _verify(item, render(calls[::-1], "tool_call"), partial_credit=True) is Status.CORRECT


# ---------------------------------------------------------------- single-field perturbations fail


def _wrong_value(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1000003
    if isinstance(value, str):
        return "zz-not-an-answer " + value
    return None


def _scalar_key(item: BfclItem, call: Call) -> str | None:
    name, arguments = call
    properties = next(doc for doc in item.functions if doc["name"] == name)["parameters"]["properties"]
    matching = {"string": str, "integer": int, "float": float, "boolean": bool}
    for key, value in arguments.items():
        declared = matching.get(properties[key]["type"])
        if declared is not None and type(value) is declared:
            return key
    return None


def _perturbations(item: BfclItem, calls: list[Call]) -> dict[str, list[Call]]:
    (name, arguments), rest = calls[0], calls[1:]
    cases = {
        "wrong_name": [(name + "_v2", arguments), *rest],
        "unknown_parameter": [(name, {**arguments, "zz_unknown": 1}), *rest],
        "missing_call": rest,
        "extra_call": [*calls, calls[0]],
    }
    required = next(doc for doc in item.functions if doc["name"] == name)["parameters"].get("required", [])
    if required:
        cases["missing_required"] = [(name, {k: v for k, v in arguments.items() if k != required[0]}), *rest]
    key = _scalar_key(item, calls[0])
    if key is not None:
        value = arguments[key]
        cases["wrong_value"] = [(name, {**arguments, key: _wrong_value(value)}), *rest]
        wrong_type = [value] if not isinstance(value, str) else 12345
        cases["wrong_type"] = [(name, {**arguments, key: wrong_type}), *rest]
    return cases


@pytest.mark.parametrize(("item", "calls"), CASES, ids=CASE_IDS)
def test_single_field_perturbations_fail(item: BfclItem, calls: list[Call]) -> None:
    perturbations = _perturbations(item, calls)
    assert {"wrong_name", "unknown_parameter"} <= perturbations.keys()
    for kind, perturbed in perturbations.items():
        for syntax in SYNTAXES:
            status = _verify(item, render(perturbed, syntax))
            expected = Status.NO_ANSWER if not perturbed else Status.WRONG
            assert status is expected, (kind, syntax)


def test_every_perturbation_kind_is_exercised() -> None:
    kinds = set().union(*(_perturbations(item, calls).keys() for item, calls in CASES))
    assert kinds == {
        "wrong_name",
        "unknown_parameter",
        "missing_call",
        "extra_call",
        "missing_required",
        "wrong_value",
        "wrong_type",
    }


# ---------------------------------------------------------------- BFCL rules on hand-built cases

DOC = {
    "name": "geo.distance",
    "parameters": {
        "type": "dict",
        "properties": {
            "city": {"type": "string"},
            "km": {"type": "float"},
            "count": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "opts": {"type": "dict"},
            "exact": {"type": "boolean"},
        },
        "required": ["city"],
    },
}
TRUTH = [
    {
        "geo.distance": {
            "city": ["New York, NY", "NYC"],
            "km": [5.0],
            "count": [3, ""],
            "tags": [["Fast Road", "toll"]],
            "opts": [{"mode": ["drive"], "avoid": ["", "tolls"]}],
            "exact": ["", False],
        }
    }
]
BASE = 'geo.distance(city="new york ny", km=5, tags=["fast-road", "TOLL"], opts={"mode": "Drive"})'


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (BASE, Status.CORRECT),
        ("[" + BASE + "]", Status.CORRECT),
        ("```python\n" + BASE + "\n```", Status.CORRECT),
        (BASE.replace("geo.distance", "geo_distance"), Status.CORRECT),
        (BASE.replace("km=5", "km=5.0"), Status.CORRECT),
        (BASE.replace("km=5", "km=5.5"), Status.WRONG),
        (BASE.replace("km=5", 'km="5"'), Status.WRONG),
        (BASE[:-1] + ", count=3)", Status.CORRECT),
        (BASE[:-1] + ", count=3.0)", Status.WRONG),
        (BASE[:-1] + ", count=True)", Status.WRONG),
        (BASE[:-1] + ", exact=0)", Status.WRONG),
        (BASE[:-1] + ", exact=False)", Status.CORRECT),
        (BASE.replace('"Drive"}', '"drive", "avoid": "tolls"}'), Status.CORRECT),
        (BASE.replace('"Drive"}', '"drive", "speed": 3}'), Status.WRONG),
        (BASE.replace('{"mode": "Drive"}', "{}"), Status.WRONG),
        (BASE.replace('"TOLL"]', '"toll", "x"]'), Status.WRONG),
        (BASE.replace('["fast-road", "TOLL"]', '["toll", "fast road"]'), Status.WRONG),
        ('geo.distance("NYC", km=5, tags=["fast road", "toll"], opts={"mode": "drive"})', Status.WRONG),
        ("I cannot compute that without a map.", Status.NO_ANSWER),
        ("[]", Status.NO_ANSWER),
        ("<think>geo.distance(city='NYC')</think>The answer is 5 km.", Status.NO_ANSWER),
        ("<think>still thinking " + BASE, Status.NO_ANSWER),
        ('{"answer": 5}', Status.UNPARSABLE),
        ("[1, 2, 3]", Status.UNPARSABLE),
        ("<tool_call>{not json}</tool_call>", Status.UNPARSABLE),
        ("geo.distance(city='NYC'", Status.UNPARSABLE),
    ],
)
def test_bfcl_rules(response: str, status: Status) -> None:
    result = verify_function_call(response, [DOC], TRUTH, "simple_python")
    assert result.status is status, result.detail


def test_doc_required_beats_optional_marker_and_variables_compare_as_written() -> None:
    truth = [{"geo.distance": {"city": ["NYC", ""], "km": [5.0], "count": ["n"], "tags": [["a"]], "opts": [{}]}}]
    without_city = "geo.distance(km=5.0, count='n', tags=['a'], opts={})"
    result = verify_function_call(without_city, [DOC], truth, "simple_python")
    assert (result.status, result.detail) == (Status.WRONG, "missing required parameter 'city'")
    # BFCL's "variable" rule: a ground-truth value of another type than declared is compared as that type
    assert verify_function_call(without_city[:-1] + ", city='nyc')", [DOC], truth, "x").status is Status.CORRECT
    assert verify_function_call(without_city.replace("'n'", "3"), [DOC], truth, "x").status is Status.WRONG


def test_tool_call_variants() -> None:
    args = {"city": "NYC", "km": 5, "tags": ["fast road", "toll"], "opts": {"mode": "drive"}}
    variants = [
        f'<tool_call>{{"name": "geo.distance", "arguments": {json.dumps(json.dumps(args))}}}</tool_call>',
        f'<tool_call>{{"name": "geo.distance", "parameters": {json.dumps(args)}}}',
        f'{{"type": "function", "function": {{"name": "geo.distance", "arguments": {json.dumps(args)}}}}}',
        f'```json\n[{{"name": "geo.distance", "arguments": {json.dumps(args)}}}]\n```',
    ]
    for response in variants:
        assert verify_function_call(response, [DOC], TRUTH, "simple_python").status is Status.CORRECT, response


def test_standardize_string_follows_bfcl() -> None:
    assert standardize_string("April 1, 2024") == standardize_string("april 1,2024") == "april12024"
    assert standardize_string("It's a/b-c_d*e^f.") == 'it"sabcdef'


def test_parallel_needs_one_to_one_assignment() -> None:
    doc = {"name": "f", "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}
    truth = [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}]
    # a greedy match would give f(x=1) to the first expected call and then fail; the assignment finds x=2 -> first
    assert verify_function_call("[f(x=1), f(x=2)]", [doc], truth, "parallel").status is Status.CORRECT
    assert verify_function_call("[f(x=1), f(x=1)]", [doc], truth, "parallel").status is Status.CORRECT
    assert verify_function_call("[f(x=2), f(x=2)]", [doc], truth, "parallel").status is Status.WRONG


# ---------------------------------------------------------------- irrelevance


IRRELEVANCE = load_bfcl("irrelevance", limit=ITEMS_PER_CATEGORY)


@pytest.mark.parametrize("item", IRRELEVANCE, ids=[item.id for item in IRRELEVANCE])
def test_irrelevance_expects_no_call(item: BfclItem) -> None:
    doc = item.functions[0]
    call = (doc["name"], {key: 1 for key in doc["parameters"].get("required", [])})
    assert _verify(item, "None of the functions can answer this; the area is 25 square meters.") is Status.CORRECT
    assert _verify(item, "[]") is Status.CORRECT
    for syntax in SYNTAXES:
        assert _verify(item, render([call], syntax)) is Status.WRONG, syntax
    # BFCL counts text that fails to decode as "no call"
    assert _verify(item, "<tool_call>{broken</tool_call>") is Status.CORRECT


def test_relevance_expects_any_call() -> None:
    item = load_bfcl("live_relevance", limit=1)[0]
    call = render([(item.functions[0]["name"], {})], "json")
    assert _verify(item, call) is Status.CORRECT
    assert _verify(item, "I will not call anything.") is Status.NO_ANSWER


# ---------------------------------------------------------------- hostile output

SIMPLE = load_bfcl("simple_python", limit=1)[0]  # calculate_triangle_area(base, height, unit)


def _hostile(marker: Path) -> list[str]:
    call = "calculate_triangle_area"
    return [
        f"__import__('os').system('touch {marker}')",
        f"[__import__('os').system('touch {marker}')]",
        f"{call}(base=__import__('os').system('touch {marker}'), height=5)",
        f'<tool_call>{{"name": "__import__(\'os\').system(\'touch {marker}\')", "arguments": {{}}}}</tool_call>',
        f"{call}(base=(lambda: __import__('os').system('touch {marker}'))(), height=5)",
        f"{call}(base=lambda: 1, height=5)",
        f"{call}(base=os.environ.get, height=5)",
        f"{call}(base=x, height=5)",
        f"{call}(base=[1][0], height=5)",
        f"{call}(base=2**10**10, height=5)",
        f"[{call}(base=10**10**10**10, height=9**9**9**9)]",
        f"{call}(base={'9' * 5000}, height=5)",
        f"{call}(base={'9' * 30}, height=5)",
        f'{{"name": "{call}", "arguments": {{"base": {"9" * 5000}, "height": 5}}}}',
        f'{{"name": "{call}", "arguments": {{"base": 1e999, "height": 5}}}}',
        f'{{"name": "{call}", "arguments": {{"base": NaN, "height": 5}}}}',
        f"{call}(base=1e999, height=5)",
        f"{call}(base=10, height=5, unit={'x' * 10_000_000!r})",
        "x" * 10_000_000,
        "[" * 20_000 + "]" * 20_000,
        "(" * 20_000 + ")" * 20_000,
        f"{call}(base=" + "[" * 20_000 + "]" * 20_000 + ", height=5)",
        f'<tool_call>{{"name": "{call}", "arguments": {{"base": ' + "[" * 20_000 + "]" * 20_000 + "}}</tool_call>",
        f"{call}(base=().__class__.__bases__[0].__subclasses__(), height=5)",
        "().__class__.__bases__[0].__subclasses__()",
        "[().__class__.__bases__[0].__subclasses__()]",
        f"{call}(**{{'base': 10, 'height': 5}})",
        f"{call}(*[10, 5])",
        f"{call}(base=10, height=5); __import__('os').system('touch {marker}')",
        f"{call}(base=f'{{__import__(\"os\").getcwd()}}', height=5)",
        f"{call}(base=b'10', height=5)",
        f"{call}(base=1j, height=5)",
        f"{call}(base=..., height=5)",
        f"{call}(base=-(-10), height=5)",
        f"{call}(base={{1: 2}}[1], height=5)",
    ]


@pytest.mark.timeout(60)
def test_hostile_output_is_rejected_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for response in _hostile(marker):
        result = verify_function_call(response, SIMPLE.functions, SIMPLE.ground_truth, SIMPLE.category)
        assert result.status in (Status.UNPARSABLE, Status.WRONG), (response[:120], result)
        assert result.score == 0.0
    statement = f"import os; os.system('touch {marker}')"
    assert (
        verify_function_call(statement, SIMPLE.functions, SIMPLE.ground_truth, "simple_python").status
        is Status.NO_ANSWER
    )
    assert not marker.exists()


def test_parser_bounds() -> None:
    with pytest.raises(CallParseError, match="longer"):
        parse_tool_calls("f(a='" + "x" * MAX_ANSWER_CHARS + "')")
    with pytest.raises(CallParseError, match="nested"):
        parse_tool_calls("f(a=" + "[" * 33 + "]" * 33 + ")")
    assert parse_tool_calls("f(a=" + "[" * 31 + "]" * 31 + ")") is not None
    with pytest.raises(CallParseError, match="calls"):
        parse_tool_calls("[" + ", ".join(["f()"] * 65) + "]")
    with pytest.raises(CallParseError, match="too large"):
        parse_tool_calls(f"f(a={2**63})")
    with pytest.raises(CallParseError, match="MemoryError"):  # the parser's stack, not the machine: unparsable
        parse_tool_calls("calc(a=" + "-" * 60_000 + "1)")
    assert parse_tool_calls(f"f(a={-(2**63) + 1}, b=-1.5, c={{1, 2}}, d=(1, 'x'), e=None)") == [
        ToolCall("f", {"a": -(2**63) + 1, "b": -1.5, "c": [1, 2], "d": [1, "x"], "e": None})
    ]
    assert parse_tool_calls("a . b . c(x=1)\nd(y=2)") == [ToolCall("a.b.c", {"x": 1}), ToolCall("d", {"y": 2})]
    assert parse_tool_calls("f(1, 2, k=3)") == [ToolCall("f", {"*0": 1, "*1": 2, "k": 3})]
    assert parse_tool_calls("The area is 25.") is None


# ---------------------------------------------------------------- partial credit (ToolRL)

PC_DOC = {
    "name": "f",
    "parameters": {
        "type": "dict",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "integer"}},
        "required": ["a"],
    },
}
PC_TRUTH = [{"f": {"a": [1], "b": ["x"], "c": ["", 7]}}]


@pytest.mark.parametrize(
    ("response", "score", "status"),
    [
        ('f(a=1, b="x")', 4.0, Status.CORRECT),
        ('f(a=1, b="x", c=7)', 4.0, Status.CORRECT),
        # names 1, keys 1, values 1/2: r_match 2.5 of 3 -> 6*2.5/3-3 = 2, plus format 1
        ('f(a=1, b="y")', 3.0, Status.WRONG),
        # optional c supplied wrong: keys {a,b,c} all present, values 2/3 -> (1+1+2/3)/3*6-3 = 7/3
        ('f(a=1, b="x", c=8)', 1.0 + 7.0 / 3.0, Status.WRONG),
        # unknown key z: keys 2/3, values 2/2 -> (1+2/3+1)/3*6-3 = 7/3
        ('f(a=1, b="x", z=2)', 1.0 + 7.0 / 3.0, Status.WRONG),
        # missing b: keys 1/2, values 1/2 -> (1+1)/3*6-3 = 1
        ("f(a=1)", 2.0, Status.WRONG),
        # wrong name: names 0/2, no pair -> -3, plus format 1
        ('g(a=1, b="x")', -2.0, Status.WRONG),
        # two calls for one: names 1/2, best pair 2 -> (0.5+2)/3*6-3 = 2
        ('[f(a=1, b="x"), f(a=1, b="x")]', 3.0, Status.WRONG),
        ("no call here", -3.0, Status.NO_ANSWER),
        ("f(a=", -3.0, Status.UNPARSABLE),
    ],
)
def test_partial_credit_formula(response: str, score: float, status: Status) -> None:
    result = verify_function_call(response, [PC_DOC], PC_TRUTH, "simple_python", partial_credit=True)
    assert result.status is status
    assert math.isclose(result.score, score, abs_tol=1e-9), result


def test_partial_credit_parallel_and_irrelevance() -> None:
    doc = {"name": "f", "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}
    truth = [{"f": {"x": [1]}}, {"f": {"x": [2]}}]
    # names 1/2, one full pair 2 of r_max 5 -> 6*2.5/5-3 = 0, plus format 1
    one = verify_function_call("[f(x=2)]", [doc], truth, "parallel", partial_credit=True)
    assert (one.status, one.score) == (Status.WRONG, 1.0)
    both = verify_function_call("[f(x=2), f(x=1)]", [doc], truth, "parallel", partial_credit=True)
    assert (both.status, both.score) == (Status.CORRECT, 4.0)
    assert verify_function_call("No call.", [doc], None, "irrelevance", partial_credit=True).score == 4.0
    assert verify_function_call("[f(x=1)]", [doc], None, "irrelevance", partial_credit=True).score == -2.0
    assert verify_function_call("[f(x=", [doc], None, "irrelevance", partial_credit=True).score == 3.0


class _Question:
    """A function-call question as the verifier reads it."""

    task_kind = "function_call"
    category = "simple_python"
    tools = [{"name": "calc", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}},
                                             "required": ["a"]}}]  # fmt: skip
    ground_truth = [{"calc": {"a": [1]}}]


def test_checks_run_in_killable_worker_processes() -> None:
    """A check runs in a worker process; one that outlives its deadline is `timeout` and its worker is killed and
    replaced, so nothing keeps burning CPU after the answer (issue 16.6: a thread could not be stopped)."""
    verifier = FunctionCallVerifier(workers=1)
    try:
        assert verifier.wait_ready(60)
        assert verifier.check("[calc(a=1)]", _Question(), 5.0).result(30).status is Status.CORRECT
        (pid,) = verifier.worker_pids()
        os.kill(pid, signal.SIGSTOP)  # a check that never returns to Python: only a kill ends it
        frozen = verifier.check("[calc(a=1)]", _Question(), 0.5).result(30)
        assert frozen.status is Status.TIMEOUT and frozen.score == 0.0
        deadline = time.monotonic() + 30
        while not (verifier.worker_pids() and verifier.worker_pids() != [pid]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert verifier.worker_pids() != [pid] and verifier.worker_restarts == 1
        assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not left running
        assert verifier.check("[calc(a=2)]", _Question(), 5.0).result(30).status is Status.WRONG  # the new worker
    finally:
        verifier.close()
