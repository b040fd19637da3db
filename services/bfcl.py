"""The one loader of BFCL v4 single-turn items (question, function docs, acceptable calls) from bfcl-eval's data.

Used by the learner's data source and by the function-call verifier's tests and benchmarks. The data files are
located with ``importlib.util.find_spec``, which does not run bfcl-eval's code: nothing of bfcl-eval is imported
(its checker calls ``eval``). The files are JSON Lines despite their ``.json`` suffix.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from services.jsonl import read_json_lines

BFCL_PACKAGE = "bfcl_eval"
FILE_PREFIX = "BFCL_v4_"

CALL_CATEGORIES = (
    "simple_python",
    "simple_java",
    "simple_javascript",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
"""Categories whose answer is a call set (``possible_answer`` files hold the acceptable values)."""
NO_CALL_CATEGORIES = ("irrelevance", "live_irrelevance")
"""Categories whose correct answer is to call nothing: ground truth ``[]``."""
ANY_CALL_CATEGORIES = ("live_relevance",)
"""Categories where any call is correct: no call-level ground truth (``None``), so they are no prompt source."""
CATEGORIES = CALL_CATEGORIES + NO_CALL_CATEGORIES + ANY_CALL_CATEGORIES
PROMPT_CATEGORIES = CALL_CATEGORIES + NO_CALL_CATEGORIES
"""Categories with an exact, call-level answer."""

Language = Literal["python", "java", "javascript"]


def category_language(category: str) -> Language:
    """The language whose types a category's functions use."""
    if category.endswith("_javascript"):
        return "javascript"
    return "java" if category.endswith("_java") else "python"


SCORED_CATEGORIES = tuple(c for c in PROMPT_CATEGORIES if category_language(c) == "python")
"""What a training or evaluation data source may use: the function-call verifier checks Python-typed arguments
only (BFCL's Java and JavaScript type rules are not implemented), so ``simple_java`` and ``simple_javascript``
would score every response ``error``."""


def check_categories(dataset: str) -> list[str]:
    """The comma-separated categories of ``dataset``; ValueError naming the supported ones for anything else."""
    categories = [c.strip() for c in dataset.split(",") if c.strip()]
    refused = [c for c in categories if c not in SCORED_CATEGORIES]
    if not categories or refused:
        unscored = [c for c in refused if c in PROMPT_CATEGORIES]
        why = f" ({', '.join(unscored)}: Java/JavaScript types are not verified)" if unscored else ""
        raise ValueError(
            f"data.dataset must list BFCL categories from {', '.join(SCORED_CATEGORIES)}; got {refused or dataset!r}"
            + why
        )
    return categories


@dataclass(frozen=True, slots=True)
class BfclItem:
    """One BFCL question: its chat messages, the function docs offered and the acceptable calls."""

    id: str
    category: str
    messages: list[dict[str, str]]
    functions: list[dict[str, Any]]
    ground_truth: list[dict[str, Any]] | None
    """Acceptable calls (BFCL's possible answer); ``[]`` for no-call categories, None for any-call ones."""

    @property
    def language(self) -> Language:
        """The language whose types the category's functions use."""
        return category_language(self.category)


def data_dir() -> Path:
    """Folder of the installed bfcl-eval data files; ValueError when bfcl-eval is not installed."""
    spec = importlib.util.find_spec(BFCL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("BFCL data needs the bfcl-eval package: pip install --no-deps bfcl-eval==2026.3.23")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise ValueError(f"bfcl-eval is installed but has no data folder at {folder}")
    return folder


def _answers(folder: Path, category: str) -> dict[str, list[dict[str, Any]]]:
    if category not in CALL_CATEGORIES:
        return {}
    path = folder / "possible_answer" / f"{FILE_PREFIX}{category}.json"
    return {str(row["id"]): row["ground_truth"] for _, row in read_json_lines(path)}


def load_bfcl(category: str, limit: int | None = None) -> list[BfclItem]:
    """The first ``limit`` items (all when None) of a BFCL v4 single-turn category, in file order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; choose one of {', '.join(CATEGORIES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    folder = data_dir()
    path = folder / f"{FILE_PREFIX}{category}.json"
    answers = _answers(folder, category)
    items = []
    for number, row in islice(read_json_lines(path), limit):
        where = f"{path} line {number}"
        turns = row.get("question")
        if not isinstance(turns, list) or len(turns) != 1 or not isinstance(turns[0], list):
            raise ValueError(f"{where}: expected a single-turn question (one list of chat turns)")
        item_id = str(row["id"])
        if category in CALL_CATEGORIES and item_id not in answers:
            raise ValueError(f"{where}: item {item_id} has no possible answer")
        ground_truth = answers.get(item_id, [] if category in NO_CALL_CATEGORIES else None)
        items.append(BfclItem(item_id, category, list(turns[0]), row.get("function") or [], ground_truth))
    return items
