"""Load BFCL v4 single-turn items (questions, function docs, possible answers) from the installed bfcl-eval data.

The data files are located with ``importlib.util.find_spec``, which does not run ``bfcl_eval``'s code; nothing
of bfcl-eval is imported. Files are JSON Lines despite their ``.json`` suffix.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

BFCL_PACKAGE = "bfcl_eval"
BFCL_VERSION_PREFIX = "BFCL_v4_"

# Single-turn categories that the function-call verifier can check (Python types, AST comparison or relevance).
CATEGORIES_WITH_ANSWERS = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
CATEGORIES_WITHOUT_ANSWERS = ("irrelevance", "live_irrelevance", "live_relevance")
CATEGORIES = CATEGORIES_WITH_ANSWERS + CATEGORIES_WITHOUT_ANSWERS


@dataclass(frozen=True, slots=True)
class BfclItem:
    """One BFCL question: its chat messages, the function docs offered and the acceptable calls."""

    id: str
    category: str
    messages: list[dict[str, str]]
    functions: list[dict[str, Any]]
    ground_truth: list[dict[str, Any]] | None


def bfcl_data_dir() -> Path:
    """Folder of the installed bfcl-eval data files; raises ModuleNotFoundError when bfcl-eval is not installed."""
    spec = importlib.util.find_spec(BFCL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{BFCL_PACKAGE} is not installed; install it with `pip install --no-deps bfcl-eval`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def load_bfcl(category: str, limit: int | None = None) -> list[BfclItem]:
    """The first ``limit`` items (all when None) of a BFCL v4 single-turn category, in file order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; choose one of {', '.join(CATEGORIES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    data_dir = bfcl_data_dir()
    file_name = f"{BFCL_VERSION_PREFIX}{category}.json"
    questions = list(islice(_read_jsonl(data_dir / file_name), limit))
    answers: dict[str, list[dict[str, Any]]] = {}
    if category in CATEGORIES_WITH_ANSWERS:
        answers = {row["id"]: row["ground_truth"] for row in _read_jsonl(data_dir / "possible_answer" / file_name)}
    items = []
    for row in questions:
        if category in CATEGORIES_WITH_ANSWERS and row["id"] not in answers:
            raise ValueError(f"BFCL item {row['id']} has no possible answer in {file_name}")
        items.append(
            BfclItem(
                id=row["id"],
                category=category,
                messages=[message for turn in row["question"] for message in turn],
                functions=row["function"],
                ground_truth=answers.get(row["id"]),
            )
        )
    return items
