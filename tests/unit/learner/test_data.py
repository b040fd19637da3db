"""Dataset items: reasoning-gym, BFCL, JSONL and Parquet sources, few-shot prompts, per-epoch order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from learner.data import DataItem, EpochOrder, load_items, pick_examples
from learner.prompts import MATH_INSTRUCTION, build_function_call_messages
from services.bfcl import PROMPT_CATEGORIES, SCORED_CATEGORIES, load_bfcl
from services.config import DataConfig, RunConfig

CHAIN_SUM_ARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def chain_sum(**overrides: Any) -> DataConfig:
    fields: dict[str, Any] = {"dataset_args": CHAIN_SUM_ARGS, "size": 40, "seed": 3}
    fields.update(overrides)
    return DataConfig(**fields)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- reasoning-gym ----------------------------------------------------------------------------------------------


def test_chain_sum_items_are_deterministic_unique_and_json_able() -> None:
    first, second = load_items(chain_sum()), load_items(chain_sum())
    assert first == second
    assert len(first) == 40
    assert [item.item_id for item in first] == [f"chain_sum:3:{i}" for i in range(40)]
    item = first[0]
    assert item.task_kind == "math" and item.tools == [] and item.category == "chain_sum"
    assert isinstance(item.ground_truth, str) and item.ground_truth.lstrip("-").isdigit()
    assert json.loads(json.dumps(item.to_dict())) == item.to_dict()


def test_chain_sum_other_seed_gives_other_items() -> None:
    base, other = load_items(chain_sum()), load_items(chain_sum(seed=4, size=5))
    assert other[0].item_id == "chain_sum:4:0"
    assert [i.messages[-1] for i in base[:5]] != [i.messages[-1] for i in other]


def test_few_shot_examples_differ_from_item_and_end_in_boxed() -> None:
    for item in load_items(chain_sum(few_shot=2)):
        roles = [m["role"] for m in item.messages]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        question = item.messages[-1]["content"]
        assert question.endswith(MATH_INSTRUCTION)
        for example, answer in zip(item.messages[0:4:2], item.messages[1:4:2], strict=True):
            assert example["content"] != question
            assert example["content"].endswith(MATH_INSTRUCTION)
            assert answer["content"].endswith("}") and "\\boxed{" in answer["content"]
            boxed = answer["content"].rsplit("\\boxed{", 1)[1][:-1]
            assert boxed != item.ground_truth  # copying the example's answer is never right
            assert len(answer["content"]) < 80


def test_worked_answer_is_correct_for_its_question() -> None:
    item = load_items(chain_sum(size=1))[0]
    question, answer = item.messages[0]["content"], item.messages[1]["content"]
    expression = question.split(":", 1)[1].split("=")[0].strip()
    left, op, right = expression.split()
    value = int(left) + int(right) if op == "+" else int(left) - int(right)
    assert answer == f"{expression} = {value}, so the final answer is \\boxed{{{value}}}"


def test_zero_shot_and_system_prompt() -> None:
    item = load_items(chain_sum(few_shot=0, system_prompt="Be brief.", size=2))[0]
    assert [m["role"] for m in item.messages] == ["system", "user"]
    assert item.messages[0]["content"] == "Be brief."


def test_pick_examples_never_returns_the_entry_even_from_a_tiny_pool() -> None:
    entry = {"question": "1 + 1 =", "answer": "2"}
    pool = [entry, {"question": "0 + 2 =", "answer": "2"}, {"question": "1 + 2 =", "answer": "3"}]
    chosen = pick_examples(pool, entry, 2, "k")
    assert chosen[0]["answer"] == "3"  # a different answer is preferred
    assert entry not in chosen and len(chosen) == 2
    assert pick_examples(pool, entry, 2, "k") == chosen


def test_bad_generator_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="chain_sum"):
        load_items(chain_sum(dataset_args={"min_terms": 3, "max_terms": 2}))
    with pytest.raises(ValueError, match="no_such_arg"):
        load_items(chain_sum(dataset_args={"no_such_arg": 1}))


# --- epoch order ------------------------------------------------------------------------------------------------


def test_epoch_orders_are_permutations_reproducible_and_differ_per_epoch() -> None:
    order = EpochOrder(size=50, seed=7)
    first = order.order(0)
    assert sorted(first) == list(range(50))
    assert EpochOrder(size=50, seed=7).order(0) == first
    assert order.order(1) != first
    assert EpochOrder(size=50, seed=8).order(0) != first
    assert [order.item_index(1, i) for i in range(50)] == order.order(1)


def test_epoch_order_rejects_bad_positions() -> None:
    with pytest.raises(ValueError):
        EpochOrder(size=0)
    with pytest.raises(ValueError):
        EpochOrder(size=3).item_index(0, 3)
    with pytest.raises(ValueError):
        EpochOrder(size=3).order(-1)


# --- files ------------------------------------------------------------------------------------------------------


def test_jsonl_rows_of_both_shapes(tmp_path: Path) -> None:
    tools = [{"name": "add", "description": "Add.", "parameters": {"type": "dict", "properties": {}}}]
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": "What is 2 + 2?", "answer": 4},
            {"id": "m1", "messages": [{"role": "user", "content": "Hi"}], "ground_truth": "x", "category": "toy"},
            {
                "task_kind": "function_call",
                "prompt": "Add 1 and 2.",
                "ground_truth": [{"add": {"a": [1], "b": [2]}}],
                "tools": tools,
            },
            "",
        ],
    )
    items = load_items(DataConfig(source="jsonl", path=str(path), system_prompt="Sys."))
    assert [i.item_id for i in items] == ["data.jsonl:1", "m1", "data.jsonl:3"]
    first, second, third = items
    assert first.ground_truth == "4" and first.category == "math"
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.messages[1]["content"].endswith(MATH_INSTRUCTION)
    assert second.messages == [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"}]
    assert second.category == "toy"
    assert third.task_kind == "function_call" and third.tools == tools
    assert third.ground_truth == [{"add": {"a": [1], "b": [2]}}]
    assert "<tools>" in third.messages[0]["content"] and third.messages[0]["content"].startswith("Sys.")
    assert third.messages[1] == {"role": "user", "content": "Add 1 and 2."}


def test_dapo_math_row_shape(tmp_path: Path) -> None:
    row = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Solve x + 1 = 3.\n\nRemember to put your answer after 'Answer:'."}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "2", "style": "rule"},
        "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
    }
    item = load_items(DataConfig(source="jsonl", path=str(write_jsonl(tmp_path / "dapo.jsonl", [row]))))[0]
    assert item.item_id == "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"
    assert item.ground_truth == "2" and item.category == "math_dapo"
    assert item.messages == row["prompt"]  # chat turns are used as written


def test_parquet_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist(
        [
            {"prompt": [{"role": "user", "content": "1 + 1?"}], "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "user", "content": "2 + 2?"}], "reward_model": {"ground_truth": "4"}},
        ]
    )
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    items = load_items(DataConfig(source="parquet", path=str(path)))
    assert [(i.item_id, i.ground_truth) for i in items] == [("train.parquet:1", "2"), ("train.parquet:2", "4")]
    assert items[1].messages == [{"role": "user", "content": "2 + 2?"}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"prompt": "1 + 1?", ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"prompt": "1 + 1?"}, "answer"),
        ({"answer": "2"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}], "answer": "2"}, "role"),
        ({"prompt": "1 + 1?", "answer": ["2"]}, "math row"),
        ({"prompt": "1 + 1?", "answer": "2", "task_kind": "poetry"}, "task_kind"),
        ({"prompt": "x", "answer": "2", "tools": "add"}, "tools"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path: Path, row: Any, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, row])
    with pytest.raises(ValueError, match=message) as info:
        load_items(DataConfig(source="jsonl", path=str(path)))
    assert f"{path} line 2:" in str(info.value)


def test_duplicate_ids_and_missing_files_are_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a", "answer": "1"}] * 2)
    with pytest.raises(ValueError, match="more than once"):
        load_items(DataConfig(source="jsonl", path=str(path)))
    with pytest.raises(ValueError, match="does not exist"):
        load_items(DataConfig(source="jsonl", path=str(tmp_path / "missing.jsonl")))
    not_parquet = write_jsonl(tmp_path / "x.parquet", [{"a": 1}])
    with pytest.raises(ValueError, match="Parquet"):
        load_items(DataConfig(source="parquet", path=str(not_parquet)))


# --- BFCL -------------------------------------------------------------------------------------------------------


def bfcl(dataset: str) -> list[DataItem]:
    pytest.importorskip("bfcl_eval", reason="bfcl-eval (installed with --no-deps) provides the BFCL data files")
    return load_items(DataConfig(source="bfcl", task_kind="function_call", dataset=dataset))


def test_bfcl_items_have_functions_and_ground_truth() -> None:
    items = bfcl("simple_python, parallel_multiple,live_simple")
    by_category = {c: [i for i in items if i.category == c] for c in ("simple_python", "parallel_multiple")}
    assert len(by_category["simple_python"]) == 400
    first = by_category["simple_python"][0]
    assert first.item_id == "simple_python_0" and first.task_kind == "function_call"
    assert first.tools[0]["name"] == "calculate_triangle_area"
    assert first.ground_truth == [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
    assert first.messages[0]["role"] == "system" and first.messages[1]["role"] == "user"
    system = first.messages[0]["content"]
    assert "<tools>" in system and "<tool_call>" in system and '"type": "object"' in system
    assert all(len(i.ground_truth) == 2 for i in by_category["parallel_multiple"][:5])
    assert all(i.tools and i.ground_truth for i in items)
    assert len({i.item_id for i in items}) == len(items)


def test_bfcl_irrelevance_has_empty_ground_truth() -> None:
    items = bfcl("irrelevance")
    assert len(items) == 240
    assert all(i.ground_truth == [] and i.tools for i in items)


def test_bfcl_java_prompt_passes_arguments_as_strings() -> None:
    pytest.importorskip("bfcl_eval", reason="bfcl-eval (installed with --no-deps) provides the BFCL data files")
    raw = load_bfcl("simple_java")[0]  # (no data source offers it: the verifier checks Python types only)
    messages = build_function_call_messages(raw.messages, raw.functions, None, raw.language)
    schema_line = messages[0]["content"].split("<tools>\n", 1)[1].split("\n", 1)[0]
    params = json.loads(schema_line)["function"]["parameters"]["properties"]
    assert {p["type"] for p in params.values()} == {"string"}
    assert "Java 8 SDK" in schema_line


def test_bfcl_rejects_unsupported_categories() -> None:
    with pytest.raises(ValueError, match="multi_turn_base"):
        bfcl("simple_python,multi_turn_base")
    assert "live_relevance" not in PROMPT_CATEGORIES


@pytest.mark.parametrize("category", ["simple_java", "simple_javascript"])
def test_java_and_javascript_categories_are_refused_when_the_config_loads(category: str) -> None:
    # Their responses could only ever score `error` (the verifier checks Python types): refuse before any run starts.
    with pytest.raises(ValueError, match="Java/JavaScript types are not verified") as refused:
        RunConfig(data={"source": "bfcl", "task_kind": "function_call", "dataset": f"simple_python,{category}"})
    assert "simple_python, multiple" in str(refused.value) and category not in SCORED_CATEGORIES


def test_function_call_messages_merge_leading_system_turns() -> None:
    turns = [{"role": "system", "content": "Item rules."}, {"role": "user", "content": "Go"}]
    messages = build_function_call_messages(turns, [{"name": "f", "parameters": {"type": "dict"}}], "Run rules.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Run rules.\n\nItem rules.\n\n")
