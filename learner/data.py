"""Dataset items for the prompt feeder: reasoning-gym generators, BFCL v4 categories, JSONL and Parquet files.

`load_items(cfg)` returns the items of one epoch in a fixed order; `EpochOrder` shuffles their indices per epoch, so
a feeder position (epoch, index) names exactly one item and survives a restart. docs/DATA.md describes the sources,
the row shapes files may use and how prompts are built.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from learner.prompts import Message, build_function_call_messages, build_math_messages, worked_answer
from services import bfcl
from services.config import DataConfig
from services.extensions import TASK_KINDS, TaskKind
from services.jsonl import read_json_lines

ROLES = frozenset({"system", "user", "assistant", "tool"})

FEW_SHOT_SEED_OFFSET = 1_000_003
"""Worked examples come from the same generator seeded `seed + offset`: a different stream than the items."""
FEW_SHOT_POOL = 64
"""Candidate worked examples generated once per load; each item draws its examples from this pool."""


@dataclass(frozen=True)
class DataItem:
    """One prompt of the dataset; every field is JSON-able so it travels in the prompts stream as is."""

    item_id: str
    task_kind: TaskKind
    messages: list[Message]
    ground_truth: str | list[Any] | dict[str, Any]
    tools: list[dict[str, Any]]
    category: str

    def to_dict(self) -> dict[str, Any]:
        """The item as a plain dict (deep copy)."""
        return asdict(self)


def load_items(cfg: DataConfig) -> list[DataItem]:
    """All items of the configured source, in a fixed order (shuffle per epoch with EpochOrder)."""
    if cfg.source == "reasoning_gym":
        items = reasoning_gym_items(cfg)
    elif cfg.source == "bfcl":
        items = bfcl_items(cfg)
    else:
        if not cfg.path:
            raise ValueError(f"data.source={cfg.source} needs data.path: set it to the file to read")
        items = file_items(Path(cfg.path), cfg)
    if not items:
        raise ValueError(f"data source {cfg.source} ({cfg.path or cfg.dataset}) produced no items")
    return items


# --- reasoning-gym ----------------------------------------------------------------------------------------------


def _create_generator(name: str, size: int, seed: int, args: dict[str, Any]) -> Any:
    import reasoning_gym  # heavy import (hundreds of generators): only when this source is used

    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **args)
    except (TypeError, AssertionError) as exc:
        # reasoning-gym reports bad arguments as TypeError (unknown field) or AssertionError (validate())
        raise ValueError(f"reasoning-gym dataset {name!r} rejected data.dataset_args={args}: {exc}") from exc


def _worked_example(entry: dict[str, Any]) -> tuple[str, str]:
    expression = entry.get("metadata", {}).get("expression")
    return entry["question"], worked_answer(str(entry["answer"]), expression if isinstance(expression, str) else None)


def pick_examples(pool: Sequence[dict[str, Any]], entry: dict[str, Any], count: int, key: str) -> list[dict[str, Any]]:
    """Up to `count` pool entries for `entry`, drawn deterministically from `key`; never the entry's own question,
    and not its answer either while other candidates remain (so copying the example's answer is never right)."""
    if count == 0:
        return []
    candidates = [e for e in pool if e["question"] != entry["question"]]
    random.Random(key).shuffle(candidates)
    other_answer = [e for e in candidates if str(e["answer"]) != str(entry["answer"])]
    chosen = other_answer[:count]
    if len(chosen) < count:
        chosen += [e for e in candidates if e not in chosen][: count - len(chosen)]
    return chosen


def reasoning_gym_items(cfg: DataConfig) -> list[DataItem]:
    """`cfg.size` items of a reasoning-gym generator, ids `name:seed:index`, each with `cfg.few_shot` examples."""
    name = cfg.dataset.strip()
    generator = _create_generator(name, cfg.size, cfg.seed, dict(cfg.dataset_args))
    pool: list[dict[str, Any]] = []
    if cfg.few_shot:
        pool_size = max(FEW_SHOT_POOL, 4 * cfg.few_shot)
        pool = list(_create_generator(name, pool_size, cfg.seed + FEW_SHOT_SEED_OFFSET, dict(cfg.dataset_args)))
    items = []
    for index in range(cfg.size):
        entry = generator[index]
        item_id = f"{name}:{cfg.seed}:{index}"
        examples = [_worked_example(e) for e in pick_examples(pool, entry, cfg.few_shot, f"{item_id}:few-shot")]
        items.append(
            DataItem(
                item_id=item_id,
                task_kind=cfg.task_kind,
                messages=build_math_messages(entry["question"], examples, cfg.system_prompt),
                ground_truth=str(entry["answer"]),
                tools=[],
                category=name,
            )
        )
    return items


# --- BFCL -------------------------------------------------------------------------------------------------------


def bfcl_items(cfg: DataConfig) -> list[DataItem]:
    """Items of the comma-separated BFCL v4 categories in `cfg.dataset`, in file order."""
    categories = bfcl.check_categories(cfg.dataset)
    items = [
        DataItem(
            item_id=item.id,
            task_kind="function_call",
            messages=build_function_call_messages(
                _check_messages(item.messages, f"BFCL item {item.id}"),
                item.functions,
                cfg.system_prompt,
                item.language,
            ),  # fmt: skip
            ground_truth=item.ground_truth if item.ground_truth is not None else [],
            tools=item.functions,
            category=item.category,
        )
        for category in categories
        for item in bfcl.load_bfcl(category)
    ]
    _check_unique_ids(items, cfg.dataset)
    return items


# --- files ------------------------------------------------------------------------------------------------------


def _check_messages(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: messages must be a non-empty list of chat turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: each chat turn needs a role in {sorted(ROLES)} and a string content")
        messages.append({"role": turn["role"], "content": turn["content"]})
    return messages


def _row_ground_truth(row: dict[str, Any], task_kind: str, where: str) -> str | list[Any] | dict[str, Any]:
    reward_model = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    candidates = (row.get("ground_truth"), row.get("answer"), reward_model.get("ground_truth"))
    value = next((v for v in candidates if v is not None), None)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if task_kind == "math" and not (isinstance(value, str) and value.strip()):
        raise ValueError(f"{where}: a math row needs a non-empty `answer` or `ground_truth` (string or number)")
    if not isinstance(value, str | list | dict):
        raise ValueError(
            f"{where}: needs `answer`, `ground_truth` or `reward_model.ground_truth` (string, list or dict)"
        )
    return value


def _row_messages(
    row: dict[str, Any], task_kind: str, tools: list[dict[str, Any]], cfg: DataConfig, where: str
) -> list[Message]:
    prompt = row.get("messages", row.get("prompt"))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: `prompt` is empty")
        if task_kind == "math":
            return build_math_messages(prompt, (), cfg.system_prompt)
        turns: list[Message] = [{"role": "user", "content": prompt}]
    elif prompt is None:
        raise ValueError(f"{where}: needs `messages` (chat turns) or `prompt` (a string or chat turns)")
    else:
        turns = _check_messages(prompt, where)
    if task_kind == "function_call" and tools:
        return build_function_call_messages(turns, tools, cfg.system_prompt)
    if cfg.system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": cfg.system_prompt}, *turns]
    return turns


def _row_item(row: dict[str, Any], cfg: DataConfig, where: str, default_id: str) -> DataItem:
    task_kind = row.get("task_kind", cfg.task_kind)
    if task_kind not in TASK_KINDS:
        raise ValueError(f"{where}: task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
    tools = row.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{where}: `tools` must be a list of function docs (JSON objects)")
    extra_info = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    item_id = row.get("id", extra_info.get("index"))
    category = row.get("category") or row.get("data_source") or task_kind
    return DataItem(
        item_id=default_id if item_id is None else str(item_id),
        task_kind=task_kind,
        messages=_row_messages(row, task_kind, tools, cfg, where),
        ground_truth=_row_ground_truth(row, task_kind, where),
        tools=tools,
        category=str(category),
    )


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq  # only the parquet source needs pyarrow

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError) for an unreadable file
        raise ValueError(f"{path}: cannot read as Parquet: {exc}") from exc
    yield from enumerate(table.to_pylist(), start=1)


def file_items(path: Path, cfg: DataConfig) -> list[DataItem]:
    """Items of a JSONL or Parquet file, one per row (rows: see docs/DATA.md); ids default to `file:line`."""
    if not path.is_file():
        raise ValueError(f"data.path {path} does not exist or is not a file")
    rows = _read_parquet(path) if cfg.source == "parquet" else read_json_lines(path)
    unit = "row" if cfg.source == "parquet" else "line"
    items = [_row_item(row, cfg, f"{path} {unit} {number}", f"{path.name}:{number}") for number, row in rows]
    _check_unique_ids(items, str(path))
    return items


def _check_unique_ids(items: Sequence[DataItem], source: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise ValueError(f"{source}: item id {item.item_id!r} occurs more than once; ids must be unique")
        seen.add(item.item_id)


# --- epoch order ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _permutation(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(size))
    # A string seed goes through SHA-512 in random.Random: the same order in every process and Python run
    random.Random(f"dipo-epoch:{seed}:{epoch}").shuffle(order)
    return tuple(order)


@dataclass(frozen=True)
class EpochOrder:
    """Deterministic per-epoch shuffle of `size` item indices: position (epoch, index) names one item."""

    size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"EpochOrder needs at least one item, got size={self.size}")

    def order(self, epoch: int) -> list[int]:
        """The item indices of `epoch` in feeding order (a permutation of range(size))."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return list(_permutation(self.size, self.seed, epoch))

    def item_index(self, epoch: int, index: int) -> int:
        """The item index at feeder position (epoch, index)."""
        if not 0 <= index < self.size:
            raise ValueError(f"position index must be in [0, {self.size}), got {index}")
        return _permutation(self.size, self.seed, epoch)[index]
