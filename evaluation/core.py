"""Evaluation: sample K responses per item through a rollout backend, verify each, and report mean/pass/maj@K.

A tool, not a service: it imports the rollout backends, the verifiers and the learner's data module, and none of
the three services imports it. docs/EVALUATION.md describes the data specs, the held-out set, the metrics and the
JSON result. torch and transformers are imported only when a backend is built, so spec errors fail fast.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import numpy as np
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from learner.data import DataItem
from reward_service.verifiers.base import Status, VerifyResult
from reward_service.verify import Verifiers
from services.config import DataConfig, RewardConfig
from services.stats import bootstrap_ci

if TYPE_CHECKING:
    from rollout_server.backends import Backend, BackendOptions, PromptGroup
    from services.protocol import Sampling

SCHEMA_VERSION = 1
"""Version of the JSON result layout (EvalResult.to_dict); bump it when a key changes meaning."""
HELD_OUT_SEED_OFFSET = 10_000
"""A generated held-out set uses the training seed plus a multiple of this that exceeds the training size."""
SPEC_SOURCES = ("reasoning_gym", "bfcl", "jsonl", "parquet")
_DATA_FIELDS = ("size", "seed", "few_shot", "system_prompt", "task_kind")
"""Spec query keys that set DataConfig fields; every other key of a reasoning_gym spec is a generator argument."""
"""The interval is a function of the verdicts alone: the same verdicts always give the same interval."""
_LATEX_NOISE = re.compile(r"\\left|\\right|\\[,;:! ]|\s+")
_NO_CALL = "[]"


# --- data -----------------------------------------------------------------------------------------------------


def parse_data_spec(spec: str) -> DataConfig:
    """Turn `SOURCE:TARGET[?key=value&...]` into a DataConfig (see docs/EVALUATION.md for the grammar)."""
    source, sep, rest = spec.partition(":")
    target, _, query = rest.partition("?")
    if not sep or source not in SPEC_SOURCES or not target.strip():
        raise ValueError(
            f"--data {spec!r} is not a data spec: use SOURCE:TARGET[?key=value&...] with SOURCE one of "
            f"{', '.join(SPEC_SOURCES)}, e.g. reasoning_gym:chain_sum?size=200&min_terms=2, "
            "bfcl:simple_python,multiple or jsonl:path/to/file.jsonl"
        )
    fields, args = _spec_query(spec, query)
    if source != "reasoning_gym" and args:
        raise ValueError(f"--data {spec!r}: unknown keys {sorted(args)} (allowed: {', '.join(_DATA_FIELDS)})")
    values: dict[str, Any] = {"source": source, **fields}
    if source == "reasoning_gym":
        values |= {"dataset": target, "dataset_args": args, "task_kind": fields.get("task_kind", "math")}
        values.setdefault("seed", HELD_OUT_SEED_OFFSET)  # the held-out stream of a default (seed 0) training run
    elif source == "bfcl":
        values |= {"dataset": target, "task_kind": fields.get("task_kind", "function_call")}
    else:
        values["path"] = target
    try:
        return DataConfig.model_validate(values)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError; say which flag was wrong
        raise ValueError(f"--data {spec!r}: {exc}") from exc


def _spec_query(spec: str, query: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the query of a spec into DataConfig fields and generator arguments; values are YAML scalars."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError as exc:
        raise ValueError(f"--data {spec!r}: the part after '?' must be key=value pairs joined by '&'") from exc
    fields: dict[str, Any] = {}
    args: dict[str, Any] = {}
    for key, raw in pairs:
        target = fields if key in _DATA_FIELDS else args
        if key in target:
            raise ValueError(f"--data {spec!r}: key {key!r} is given twice")
        target[key] = raw if key == "system_prompt" else _scalar(raw)
    return fields, args


def _scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def held_out_data(train: DataConfig) -> DataConfig:
    """The data section of a held-out set for a training data section: a generator re-seeded past the training
    stream; file and BFCL sources have no second stream, so they come back unchanged (the overlap report shows it)."""
    if train.source != "reasoning_gym":
        return train
    # reasoning-gym generators seed item i with seed + i, so the offset must exceed the training size.
    offset = HELD_OUT_SEED_OFFSET * (train.size // HELD_OUT_SEED_OFFSET + 1)
    return train.model_copy(update={"seed": train.seed + offset})


def _question(item: DataItem) -> str:
    """The last user turn: what the model is asked, without the worked examples and tool docs around it."""
    return next((m["content"] for m in reversed(item.messages) if m["role"] == "user"), "")


def seen_questions(train: Sequence[DataItem], held_out: Sequence[DataItem]) -> set[str]:
    """Ids of held-out items whose question text also occurs in the training set."""
    train_questions = {_question(item) for item in train}
    return {item.item_id for item in held_out if _question(item) in train_questions}


def overlap_report(train: Sequence[DataItem], held_out: Sequence[DataItem]) -> dict[str, Any]:
    """How many held-out items share an id, or their question text, with a training item."""
    train_ids = {item.item_id for item in train}
    id_overlap = [item.item_id for item in held_out if item.item_id in train_ids]
    question_overlap = len(seen_questions(train, held_out))
    return {
        "train_items": len(train),
        "eval_items": len(held_out),
        "id_overlap": len(id_overlap),
        "id_overlap_examples": id_overlap[:5],
        "question_overlap": question_overlap,
        "question_overlap_share": question_overlap / len(held_out) if held_out else 0.0,
    }


def first_per_category(items: Sequence[DataItem], limit: int | None) -> list[DataItem]:
    """The first `limit` items of each category, in the original order (all items when `limit` is None)."""
    if limit is None:
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    taken: Counter[str] = Counter()
    chosen = []
    for item in items:
        if taken[item.category] < limit:
            taken[item.category] += 1
            chosen.append(item)
    return chosen


def check_items(items: Sequence[DataItem]) -> None:
    """Raise ValueError before any generation when an item cannot be verified (by the reward service's verifiers)."""
    if not items:
        raise ValueError("no items to evaluate")
    for item in items:
        try:
            Verifiers.validate(item)
        except ValueError as exc:
            raise ValueError(f"item {item.item_id}: {exc}") from exc


# --- verdicts and metrics ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleVerdict:
    """One verified response: status, correctness, the answer the verifier extracted, and its length."""

    status: str
    correct: bool
    extracted: str | None = None
    tokens: int = 0
    chars: int = 0
    finish_reason: str = "stop"
    text: str | None = None


def normalize_answer(extracted: str | None, task_kind: str = "math") -> str | None:
    """The key majority voting compares: math answers lose spacing and LaTeX sizing, call sets become canonical JSON
    (an empty call set, "[]", is an answer); None means the sample abstains."""
    if task_kind == "function_call":
        if extracted is None:
            return _NO_CALL
        try:
            return json.dumps(json.loads(extracted), sort_keys=True, ensure_ascii=False)
        except json.JSONDecodeError:  # the verifier truncates very long call sets; vote on the text as is
            return extracted
    if extracted is None:
        return None
    text = _LATEX_NOISE.sub("", extracted).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.strip("$").rstrip(".")
    return text or None


def majority_vote(samples: Sequence[SampleVerdict], task_kind: str = "math") -> tuple[str | None, bool]:
    """The most frequent normalised answer (ties: the one seen first) and whether it is correct.

    Samples with the same key share one verdict: correct when any of them was verified correct (they can differ
    only when a verification timed out or errored). No votes at all count as wrong.
    """
    keys = [normalize_answer(s.extracted, task_kind) for s in samples]
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return None, False
    best = max(counts.values())
    winner = next(key for key in keys if key is not None and counts[key] == best)
    return winner, any(s.correct for s, key in zip(samples, keys, strict=True) if key == winner)


@dataclass
class ItemResult:
    """The K verdicts of one item and its majority vote."""

    item_id: str
    category: str
    task_kind: str
    ground_truth: Any
    samples: list[SampleVerdict]
    majority_answer: str | None = None
    majority_correct: bool = False

    @classmethod
    def from_samples(cls, item: DataItem, samples: list[SampleVerdict]) -> ItemResult:
        """Build the result of `item` and cast its majority vote."""
        answer, correct = majority_vote(samples, item.task_kind)
        return cls(item.item_id, item.category, item.task_kind, item.ground_truth, samples, answer, correct)

    def to_dict(self, include_responses: bool = False) -> dict[str, Any]:
        """JSON-able record; response texts only when asked for."""
        data = asdict(self)
        if not include_responses:
            for sample in data["samples"]:
                sample.pop("text")
        return data


@dataclass(frozen=True)
class Metrics:
    """Accuracy figures of a set of items with K samples each (docs/EVALUATION.md defines each one)."""

    n_items: int
    n_samples: int
    n_correct: int
    mean_at_k: float
    mean_at_k_ci95: tuple[float, float]
    pass_at_k: float
    maj_at_k: float
    status_counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the interval as a two-element list)."""
        data = asdict(self)
        data["mean_at_k_ci95"] = list(self.mean_at_k_ci95)
        return data


def compute_metrics(items: Sequence[ItemResult]) -> Metrics:
    """mean@K, its bootstrap interval, pass@K, maj@K and status counts over `items`."""
    if not items:
        raise ValueError("metrics need at least one item")
    per_item = np.array([np.mean([s.correct for s in item.samples]) for item in items], dtype=np.float64)
    n_correct = sum(s.correct for item in items for s in item.samples)
    n_samples = sum(len(item.samples) for item in items)
    statuses = Counter(s.status for item in items for s in item.samples)
    return Metrics(
        n_items=len(items),
        n_samples=n_samples,
        n_correct=n_correct,
        mean_at_k=n_correct / n_samples,
        mean_at_k_ci95=bootstrap_ci(per_item),
        pass_at_k=float(np.mean([any(s.correct for s in item.samples) for item in items])),
        maj_at_k=float(np.mean([item.majority_correct for item in items])),
        status_counts={status.value: statuses[status.value] for status in Status if statuses[status.value]},
    )


def metrics_by_category(items: Sequence[ItemResult]) -> dict[str, Metrics]:
    """compute_metrics per category, in order of first appearance."""
    groups: dict[str, list[ItemResult]] = {}
    for item in items:
        groups.setdefault(item.category, []).append(item)
    return {category: compute_metrics(group) for category, group in groups.items()}


# --- result -----------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything one evaluation measured; `to_dict()` is the JSON layout documented in docs/EVALUATION.md."""

    model: str
    backend: str
    device: str
    samples: int
    sampling: dict[str, Any]
    items: list[ItemResult]
    metrics: Metrics
    by_category: dict[str, Metrics]
    generated_tokens: int
    generation_s: float
    wall_s: float
    data: dict[str, Any] | None = None
    held_out: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of generation time (model loading and verification excluded)."""
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0

    def response_stats(self) -> dict[str, Any]:
        """Mean response length in tokens and characters, and finish-reason counts."""
        samples = [s for item in self.items for s in item.samples]
        return {
            "mean_tokens": float(np.mean([s.tokens for s in samples])),
            "mean_chars": float(np.mean([s.chars for s in samples])),
            "finish_reasons": dict(Counter(s.finish_reason for s in samples)),
        }

    def to_dict(self, include_items: bool = True, include_responses: bool = False) -> dict[str, Any]:
        """The JSON result; per-item verdicts unless `include_items` is False, response texts only when asked."""
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "backend": self.backend,
            "device": self.device,
            "samples": self.samples,
            "sampling": self.sampling,
            "data": self.data,
            "held_out": self.held_out,
            "metrics": self.metrics.to_dict(),
            "by_category": {name: m.to_dict() for name, m in self.by_category.items()},
            "response": self.response_stats(),
            "throughput": {
                "generated_tokens": self.generated_tokens,
                "generation_s": round(self.generation_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 2),
                "wall_s": round(self.wall_s, 3),
            },
        }
        if include_items:
            data["items"] = [item.to_dict(include_responses) for item in self.items]
        return data


# --- evaluation -------------------------------------------------------------------------------------------------


def batch_seed(seed: int | None, batch_index: int) -> int | None:
    """The sampling seed of one generate call: distinct per batch, a pure function of (seed, batch index)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def _batches(items: Sequence[DataItem], size: int) -> Iterator[tuple[int, Sequence[DataItem]]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start : start + size]


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("items  {task.fields[tokens_per_s]:.1f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


@dataclass
class _Pending:
    item: DataItem
    futures: list[Future[VerifyResult]]
    group: PromptGroup


def _collect(pending: _Pending, keep_responses: bool) -> ItemResult:
    samples = []
    for future, completion in zip(pending.futures, pending.group.completions, strict=True):
        verdict = future.result()
        samples.append(
            SampleVerdict(
                status=verdict.status.value,
                correct=verdict.correct,
                extracted=verdict.extracted,
                tokens=len(completion.token_ids),
                chars=len(completion.text),
                finish_reason=completion.finish_reason,
                text=completion.text if keep_responses else None,
            )
        )
    return ItemResult.from_samples(pending.item, samples)


def evaluate(
    options: BackendOptions,
    items: Sequence[DataItem],
    samples: int,
    sampling: Sampling,
    backend_kind: str = "hf",
    *,
    batch_prompts: int = 4,
    reward: RewardConfig | None = None,
    backend: Backend | None = None,
    keep_responses: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Sample `samples` responses per item of `options.model`, verify them and compute the metrics.

    `sampling.seed` makes the run deterministic (each batch gets `batch_seed(seed, index)`, so results also depend
    on `batch_prompts`). Pass a ready `backend` to reuse a loaded model; it is then left open. Responses are
    verified as the reward service verifies them (`reward`: its verifiers, time bound and partial-credit rule).
    """
    if samples < 1 or batch_prompts < 1:
        raise ValueError(f"samples and batch_prompts must be >= 1, got {samples} and {batch_prompts}")
    check_items(items)
    started = time.perf_counter()
    # started before the model loads, so that verifier workers warm up meanwhile
    verifiers = Verifiers(reward or RewardConfig(), kinds={item.task_kind for item in items})
    owned = backend is None
    try:
        if backend is None:
            from rollout_server.backends import create_backend  # torch and transformers load only now

            backend = create_backend(backend_kind, options)
        results, tokens, generation_s = _run(backend, items, samples, sampling, batch_prompts, verifiers,
                                             keep_responses, progress)  # fmt: skip
    finally:
        verifiers.close()
        if owned and backend is not None:
            backend.close()
    return EvalResult(
        model=str(options.model),
        backend=backend_kind,
        device=options.device,
        samples=samples,
        sampling={**_sampling_dict(sampling), "batch_prompts": batch_prompts},
        items=results,
        metrics=compute_metrics(results),
        by_category=metrics_by_category(results),
        generated_tokens=tokens,
        generation_s=generation_s,
        wall_s=time.perf_counter() - started,
    )


def _sampling_dict(sampling: Sampling) -> dict[str, Any]:
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop),
        "seed": sampling.seed,
    }


def _run(
    backend: Backend,
    items: Sequence[DataItem],
    samples: int,
    sampling: Sampling,
    batch_prompts: int,
    verifiers: Verifiers,
    keep_responses: bool,
    progress: bool,
) -> tuple[list[ItemResult], int, float]:
    """Generate batch by batch, queueing verifications as each batch ends; returns results, tokens and seconds."""
    pending: list[_Pending] = []
    tokens, generation_s = 0, 0.0
    with _progress(progress) as bar:
        task = bar.add_task("generate", total=len(items), tokens_per_s=0.0)
        for index, batch in _batches(items, batch_prompts):
            batch_sampling = replace(sampling, seed=batch_seed(sampling.seed, index))
            start = time.perf_counter()
            groups = backend.generate([item.messages for item in batch], samples, batch_sampling)
            generation_s += time.perf_counter() - start
            for item, group in zip(batch, groups, strict=True):
                tokens += sum(len(c.token_ids) for c in group.completions)
                pending.append(_Pending(item, [verifiers.submit(item, c.text) for c in group.completions], group))
            bar.update(task, advance=len(batch), tokens_per_s=tokens / generation_s if generation_s else 0.0)
    return [_collect(p, keep_responses) for p in pending], tokens, generation_s
