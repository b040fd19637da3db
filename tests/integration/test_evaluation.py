"""Evaluation: metric arithmetic on hand-built verdicts, data specs, and `python -m evaluation` as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.core import (
    HELD_OUT_SEED_OFFSET,
    ItemResult,
    SampleVerdict,
    bootstrap_ci,
    compute_metrics,
    first_per_category,
    held_out_data,
    majority_vote,
    metrics_by_category,
    normalize_answer,
    overlap_report,
    parse_data_spec,
)
from learner.data import DataItem
from services.config import DataConfig

REPO = Path(__file__).resolve().parents[2]
CHAIN_SUM = "reasoning_gym:chain_sum?size=4&min_terms=2&max_terms=2&min_digits=1&max_digits=1"
FAST = ["--samples", "2", "--max-new-tokens", "16", "--threads", "1", "--no-progress", "--seed", "7"]
RESULT_KEYS = {"schema_version", "model", "backend", "device", "samples", "sampling", "data", "held_out", "metrics",
               "by_category", "response", "throughput", "items"}  # fmt: skip
METRIC_KEYS = {"n_items", "n_samples", "n_correct", "mean_at_k", "mean_at_k_ci95", "pass_at_k", "maj_at_k",
               "status_counts"}  # fmt: skip


def verdict(extracted: str | None, correct: bool, status: str | None = None) -> SampleVerdict:
    """A hand-built verification outcome."""
    status = status or ("correct" if correct else ("wrong" if extracted is not None else "no_answer"))
    return SampleVerdict(status=status, correct=correct, extracted=extracted, tokens=3, chars=9)


def item_result(samples: list[SampleVerdict], category: str = "c", task_kind: str = "math") -> ItemResult:
    """An ItemResult with its majority vote cast."""
    item = DataItem(f"id{id(samples)}", task_kind, [{"role": "user", "content": "q"}], "1", [], category)  # type: ignore[arg-type]
    return ItemResult.from_samples(item, samples)


def data_item(item_id: str, question: str, category: str = "c") -> DataItem:
    """A math DataItem whose last user turn is `question`."""
    return DataItem(item_id, "math", [{"role": "user", "content": question}], "1", [], category)


# --- metric arithmetic (no model) --------------------------------------------------------------------------------


def test_majority_vote_counts_normalised_answers_and_breaks_ties_by_first_occurrence() -> None:
    samples = [verdict("3", False), verdict("$4$", True), verdict(" 4 ", True), verdict("3", False)]
    # "3" and "4" both have two votes; "3" occurs first, so it wins and the item is wrong under maj@K.
    assert majority_vote(samples) == ("3", False)
    assert majority_vote(samples[1:]) == ("4", True)


def test_majority_vote_abstains_without_an_answer_and_shares_a_verdict_within_a_key() -> None:
    assert majority_vote([verdict(None, False), verdict(None, False)]) == (None, False)
    assert majority_vote([verdict(None, False), verdict(None, False), verdict("7", True)]) == ("7", True)
    # A timeout on one copy of an answer does not hide that the same answer was verified correct elsewhere.
    timed_out = [verdict("\\frac{1}{2}", False, "timeout"), verdict("\\dfrac{1}{2}", True)]
    assert majority_vote(timed_out) == ("\\frac{1}{2}", True)


def test_function_call_votes_treat_no_call_as_an_answer() -> None:
    no_call = [verdict(None, True, "correct"), verdict(None, True, "correct"), verdict('[{"name": "f"}]', False)]
    assert majority_vote(no_call, "function_call") == ("[]", True)
    a = '[{"name": "f", "arguments": {"x": 1, "y": 2}}]'
    b = '[{"arguments": {"y": 2, "x": 1}, "name": "f"}]'
    assert normalize_answer(a, "function_call") == normalize_answer(b, "function_call")


def test_normalize_answer_drops_spacing_and_latex_sizing_only() -> None:
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer("12.") == "12"
    assert normalize_answer("12") != normalize_answer("12.0")  # no numeric equivalence in voting (documented)
    assert normalize_answer("$$") is None
    assert normalize_answer(None) is None


def test_compute_metrics_on_hand_built_verdicts() -> None:
    items = [
        item_result([verdict("5", True), verdict("5", True), verdict("4", False), verdict("5", True)]),  # 3/4, maj ok
        item_result([verdict("2", False), verdict("2", False), verdict("3", True), verdict(None, False)]),  # 1/4
        item_result([verdict(None, False), verdict("8", False), verdict("9", False), verdict("8", False)]),  # 0/4
    ]
    m = compute_metrics(items)
    assert (m.n_items, m.n_samples, m.n_correct) == (3, 12, 4)
    assert m.mean_at_k == pytest.approx(4 / 12)
    assert m.pass_at_k == pytest.approx(2 / 3)
    assert m.maj_at_k == pytest.approx(1 / 3)
    assert m.status_counts == {"correct": 4, "wrong": 6, "no_answer": 2}
    low, high = m.mean_at_k_ci95
    assert 0.0 <= low <= m.mean_at_k <= high <= 0.75  # 0.75 is the best per-item mean: no resample exceeds it
    assert low < high


def test_bootstrap_interval_is_degenerate_for_equal_items_and_deterministic() -> None:
    assert bootstrap_ci(np.array([0.5, 0.5, 0.5])) == (0.5, 0.5)
    spread = np.array([0.0, 0.25, 1.0, 0.5, 0.75])
    assert bootstrap_ci(spread) == bootstrap_ci(spread)
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))


def test_metrics_by_category_split_items_in_order_of_appearance() -> None:
    items = [
        item_result([verdict("1", True)], "b"),
        item_result([verdict("1", False)], "a"),
        item_result([verdict("1", True)], "b"),
    ]
    by_category = metrics_by_category(items)
    assert list(by_category) == ["b", "a"]
    assert by_category["b"].mean_at_k == 1.0 and by_category["a"].mean_at_k == 0.0


# --- data specs and held-out sets --------------------------------------------------------------------------------


def test_parse_reasoning_gym_spec_splits_data_fields_from_generator_arguments() -> None:
    cfg = parse_data_spec("reasoning_gym:chain_sum?size=200&min_terms=2&max_digits=1&few_shot=0")
    assert (cfg.source, cfg.task_kind, cfg.dataset, cfg.size, cfg.few_shot) == (
        "reasoning_gym",
        "math",
        "chain_sum",
        200,
        0,
    )
    assert cfg.dataset_args == {"min_terms": 2, "max_digits": 1}
    assert cfg.seed == HELD_OUT_SEED_OFFSET  # not the training default 0
    assert parse_data_spec("reasoning_gym:chain_sum?seed=3").seed == 3


def test_parse_bfcl_and_file_specs() -> None:
    bfcl = parse_data_spec("bfcl:simple_python,multiple")
    assert (bfcl.source, bfcl.task_kind, bfcl.dataset) == ("bfcl", "function_call", "simple_python,multiple")
    jsonl = parse_data_spec("jsonl:data/x.jsonl?task_kind=function_call")
    assert (jsonl.source, jsonl.path, jsonl.task_kind) == ("jsonl", "data/x.jsonl", "function_call")


@pytest.mark.parametrize(
    "spec",
    ["chain_sum", "hub:x", "reasoning_gym:", "reasoning_gym:chain_sum?size=0", "bfcl:multiple?min_terms=2",
     "reasoning_gym:chain_sum?size=2&size=3", "reasoning_gym:chain_sum?novalue"],
)  # fmt: skip
def test_bad_specs_raise_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="--data"):
        parse_data_spec(spec)


def test_held_out_seed_clears_the_training_stream() -> None:
    train = DataConfig(size=512, seed=3)
    assert held_out_data(train).seed == 3 + HELD_OUT_SEED_OFFSET
    # reasoning-gym seeds item i with seed + i: a big training set pushes the held-out stream past its end.
    big = DataConfig(size=25_000, seed=0)
    assert held_out_data(big).seed >= big.size
    files = DataConfig(source="jsonl", path="x.jsonl")
    assert held_out_data(files) == files


def test_overlap_report_counts_ids_and_questions() -> None:
    train = [data_item("a", "1+1"), data_item("b", "2+2")]
    held = [data_item("a", "9+9"), data_item("c", "2+2"), data_item("d", "3+3")]
    report = overlap_report(train, held)
    assert (report["id_overlap"], report["question_overlap"]) == (1, 1)
    assert report["id_overlap_examples"] == ["a"]
    assert report["question_overlap_share"] == pytest.approx(1 / 3)


def test_first_per_category_limits_each_category() -> None:
    items = [data_item(str(i), "q", "x" if i % 3 else "y") for i in range(9)]
    chosen = first_per_category(items, 2)
    assert [i.item_id for i in chosen] == ["0", "1", "2", "3"]
    assert first_per_category(items, None) == items


# --- the command line as a process --------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m evaluation` from the repository root, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "evaluation", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def check_result(result: dict[str, Any], n_items: int, samples: int) -> None:
    """The documented keys, consistent counts and metrics in [0, 1]."""
    assert RESULT_KEYS <= result.keys()
    blocks = [result["metrics"], *result["by_category"].values()]
    for block in blocks:
        assert METRIC_KEYS <= block.keys()
        low, high = block["mean_at_k_ci95"]
        assert all(
            0.0 <= value <= 1.0 for value in (block["mean_at_k"], block["pass_at_k"], block["maj_at_k"], low, high)
        )
        assert low <= block["mean_at_k"] <= high
        assert sum(block["status_counts"].values()) == block["n_samples"] == block["n_items"] * samples
    metrics = result["metrics"]
    assert metrics["n_items"] == n_items == len(result["items"])
    assert sum(b["n_items"] for b in result["by_category"].values()) == n_items
    verdicts = [s for item in result["items"] for s in item["samples"]]
    assert len(verdicts) == n_items * samples
    assert metrics["n_correct"] == sum(s["correct"] for s in verdicts)
    assert metrics["mean_at_k"] == pytest.approx(metrics["n_correct"] / (n_items * samples))
    assert metrics["pass_at_k"] >= metrics["maj_at_k"] - 1e-12  # a correct majority needs a correct sample
    assert all(1 <= s["tokens"] <= 16 for s in verdicts)
    assert result["throughput"]["generated_tokens"] == sum(s["tokens"] for s in verdicts)
    assert result["throughput"]["tokens_per_s"] > 0


@pytest.fixture(scope="module")
def chain_sum_result() -> dict[str, Any]:
    done = run_cli("--model", "smollm2-135m-instruct", "--data", CHAIN_SUM, *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_cli_math_result(chain_sum_result: dict[str, Any]) -> None:
    check_result(chain_sum_result, n_items=4, samples=2)
    assert list(chain_sum_result["by_category"]) == ["chain_sum"]
    assert chain_sum_result["data"]["seed"] == HELD_OUT_SEED_OFFSET
    assert chain_sum_result["sampling"]["seed"] == 7
    assert chain_sum_result["held_out"] is None  # no training config to compare with


def test_cli_config_held_out_set_is_deterministic(chain_sum_result: dict[str, Any], tmp_path: Path) -> None:
    # A training config whose held-out set (seed 0 + 10_000) is exactly the chain_sum spec above, with the same
    # sampling as FAST given through the config: a second run must reproduce every verdict.
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {source: reasoning_gym, dataset: chain_sum, size: 4, seed: 0, few_shot: 1,\n"
        "       dataset_args: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}\n"
        "sampling: {n: 2, max_new_tokens: 16, seed: 7}\n"
        "rollout: {torch_threads: 1, max_inflight_groups: 4}\n"
    )
    out = tmp_path / "result.json"
    done = run_cli("--config", str(config), "--no-progress", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""  # with --out nothing but the file is written
    result = json.loads(out.read_text())
    check_result(result, n_items=4, samples=2)
    assert result["items"] == chain_sum_result["items"]
    assert result["metrics"] == chain_sum_result["metrics"]
    held_out = result["held_out"]
    assert (held_out["train_seed"], held_out["eval_seed"], held_out["train_items"]) == (0, HELD_OUT_SEED_OFFSET, 4)
    assert held_out["id_overlap"] == 0
    assert 0 <= held_out["question_overlap"] <= 4
    assert "unseen_metrics" in held_out


def test_cli_function_call_result() -> None:
    done = run_cli("--model", "smollm2-135m-instruct", "--data", "bfcl:simple_python,irrelevance", "--limit", "2",
                   *FAST)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    check_result(result, n_items=4, samples=2)
    assert list(result["by_category"]) == ["simple_python", "irrelevance"]
    assert {item["task_kind"] for item in result["items"]} == {"function_call"}


@pytest.mark.parametrize(
    "args",
    [
        ["--data", "hub:chain_sum"],
        ["--data", "reasoning_gym:no_such_generator?size=2"],
        ["--data", "reasoning_gym:chain_sum?size=2&min_terms=0"],
        ["--data", "bfcl:simple_java"],
        [],
    ],
)
def test_cli_bad_input_exits_2_with_a_message(args: list[str]) -> None:
    done = run_cli("--model", "smollm2-135m-instruct", *args, "--no-progress", timeout=120)
    assert done.returncode == 2
    assert "error:" in done.stderr
    assert done.stdout == ""
