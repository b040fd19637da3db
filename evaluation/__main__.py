"""``python -m evaluation --model PATH_OR_NAME --data SPEC --samples K ...``: evaluate a model, print or write JSON.

The JSON result goes to stdout (or ``--out``); the progress bar, the summary table and logs go to stderr, so stdout
stays machine-readable. Exit codes: 0 done, 2 bad input (data spec, config, model, sampling), 1 anything else.
Defaults come from the run config (``--config``, else the built-in defaults and ``DIPO_*`` environment).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from evaluation.core import (
    EvalResult,
    Metrics,
    check_items,
    compute_metrics,
    evaluate,
    first_per_category,
    held_out_data,
    overlap_report,
    parse_data_spec,
    seen_questions,
)
from learner.data import DataItem, load_items
from services.config import ConfigError, DataConfig, RunConfig, load_config
from services.log import setup_logging

log = logging.getLogger("evaluation")

DEFAULT_SEED = 0
"""Evaluation is reproducible by default: without --seed (and without sampling.seed in the config) this is used."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (`dipo eval` passes its arguments through unchanged)."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="Sample K responses per item, verify them, report mean@K, pass@K, maj@K (docs/EVALUATION.md).",
    )
    add = parser.add_argument
    add("--model", help="Local Hugging Face folder (e.g. a learner checkpoint) or smollm2-135m-instruct "
        "(default: the config's model.name_or_path).")  # fmt: skip
    add("--data", help="Data spec: reasoning_gym:NAME?size=N&arg=v, bfcl:CAT1,CAT2, jsonl:FILE or parquet:FILE. "
        "Without it, the held-out set of --config's data section.")  # fmt: skip
    add("--config", help="Run config YAML: its data section gives the held-out set (and the training set for the "
        "overlap check); its sampling, rollout and reward sections give defaults.")  # fmt: skip
    add("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override a field of the run config: section.field=value (repeatable; beats the file and the DIPO_* "
        "environment), as `dipo run` and `dipo config show` take it.")  # fmt: skip
    add("--samples", type=int, help="K: responses per item (default: sampling.n).")
    add("--limit", type=int, help="Evaluate only the first N items of each category.")
    add("--temperature", type=float, help="Sampling temperature; 0 = greedy (default: sampling.temperature).")
    add("--top-p", type=float, help="Nucleus mass (default: sampling.top_p).")
    add("--max-new-tokens", type=int, help="Largest response length (default: sampling.max_new_tokens).")
    add("--batch-prompts", type=int, help="Prompts per generate call (default: rollout.max_inflight_groups).")
    add("--backend", choices=["hf", "vllm"], help="Sampling backend (default: rollout.backend).")
    add("--device", help="torch device of the hf backend (default: rollout.device).")
    add("--threads", type=int, help="torch threads of the hf backend (default: rollout.torch_threads).")
    add("--seed", type=int, help=f"Sampling seed (default: sampling.seed, else {DEFAULT_SEED}).")
    add("--few-shot", type=int, help="Worked examples per math prompt (default: the data section's few_shot).")
    add("--out", help="Write the JSON result here instead of stdout.")
    add("--responses", action="store_true", help="Include every response text in the JSON.")
    add("--no-items", action="store_true", help="Leave the per-item verdicts out of the JSON.")
    add("--no-progress", action="store_true", help="No progress bar.")
    add("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Log level.")
    return parser


def resolve_data(args: argparse.Namespace, cfg: RunConfig) -> tuple[DataConfig, dict[str, Any] | None]:
    """The data section to evaluate and, when a config names a training set, the held-out bookkeeping."""
    if args.data is None and args.config is None:
        raise ValueError("give --data SPEC or --config RUNCONFIG (whose data section yields a held-out set)")
    data = parse_data_spec(args.data) if args.data is not None else held_out_data(cfg.data)
    if args.few_shot is not None:
        data = DataConfig.model_validate({**data.model_dump(), "few_shot": args.few_shot})
    if args.config is None:
        return data, None
    held_out: dict[str, Any] = {"train_seed": cfg.data.seed, "eval_seed": data.seed}
    return data, held_out


def load_eval_items(args: argparse.Namespace, cfg: RunConfig) -> tuple[list[DataItem], dict[str, Any]]:
    """Items to evaluate (the first --limit of each category), the `data` / `held_out` blocks of the result and the
    ids of items whose question the training set also asks."""
    data, held_out = resolve_data(args, cfg)
    items = first_per_category(load_items(data), args.limit)
    check_items(items)
    seen: set[str] = set()
    if held_out is not None:
        train = load_items(cfg.data)
        held_out |= overlap_report(train, items)
        seen = seen_questions(train, items)
        if held_out["id_overlap"]:
            held_out["warning"] = (
                f"{held_out['id_overlap']} of {len(items)} evaluated items are training items (same id): "
                f"data.source={data.source} has no second stream to hold out; pass --data with unseen items"
            )
            log.warning("%s", held_out["warning"])
    summary = {
        "spec": args.data,
        "config": args.config,
        **data.model_dump(mode="json"),
        "limit": args.limit,
        "n_items": len(items),
    }
    return items, {"data": summary, "held_out": held_out, "seen": seen}


def model_path(name_or_path: str, cfg: RunConfig) -> str | Path:
    """The model as given, or its converted folder when the config names a cache other than the default one."""
    if not cfg.model.cache_dir:
        return name_or_path
    from services.modeling.loading import resolve_model_path

    return resolve_model_path(name_or_path, Path(cfg.model.cache_dir))


def run(args: argparse.Namespace) -> EvalResult:
    """Resolve every input (raising ValueError on bad ones), then evaluate."""
    cfg = load_config(args.config, args.overrides)
    items, blocks = load_eval_items(args, cfg)
    from rollout_server.backends import BackendOptions  # torch loads here, after every input was checked

    seed = next((s for s in (args.seed, cfg.sampling.seed) if s is not None), DEFAULT_SEED)
    sampling = cfg.sampling.record(seed=seed)
    sampling = replace(
        sampling,
        temperature=sampling.temperature if args.temperature is None else args.temperature,
        top_p=sampling.top_p if args.top_p is None else args.top_p,
        max_new_tokens=sampling.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
    )
    options = BackendOptions(
        model=model_path(args.model or cfg.model.name_or_path, cfg),
        device=args.device or cfg.rollout.device,
        dtype=cfg.model.dtype,
        num_threads=cfg.rollout.torch_threads if args.threads is None else args.threads,
        seed=seed,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
    )
    result = evaluate(
        options,
        items,
        cfg.sampling.n if args.samples is None else args.samples,
        sampling,
        backend_kind=args.backend or cfg.rollout.backend,
        batch_prompts=cfg.rollout.max_inflight_groups if args.batch_prompts is None else args.batch_prompts,
        reward=cfg.reward,
        progress=not args.no_progress,
        keep_responses=args.responses,
    )
    result.data, result.held_out = blocks["data"], blocks["held_out"]
    if result.held_out is not None:
        # Small generators repeat questions across seeds; the figures on never-seen questions are the clean ones.
        unseen = [item for item in result.items if item.item_id not in blocks["seen"]]
        result.held_out["unseen_metrics"] = compute_metrics(unseen).to_dict() if unseen else None
    return result


def _row(name: str, m: Metrics) -> list[str]:
    low, high = m.mean_at_k_ci95
    statuses = " ".join(f"{k}={v}" for k, v in m.status_counts.items())
    return [name, str(m.n_items), f"{m.mean_at_k:.3f} [{low:.3f}, {high:.3f}]", f"{m.pass_at_k:.3f}",
            f"{m.maj_at_k:.3f}", statuses]  # fmt: skip


def print_summary(result: EvalResult, console: Console) -> None:
    """A table of the metrics (overall and per category) and the throughput."""
    k = result.samples
    table = Table(title=f"{result.model}  K={k}", title_justify="left")
    for column in ("category", "items", f"mean@{k} [95% CI]", f"pass@{k}", f"maj@{k}", "statuses"):
        table.add_column(column)
    if len(result.by_category) > 1:
        for name, metrics in result.by_category.items():
            table.add_row(*_row(name, metrics))
    table.add_row(*_row("overall", result.metrics), style="bold")
    console.print(table)
    stats = result.response_stats()
    console.print(
        f"responses: {stats['mean_tokens']:.1f} tokens on average, finish {stats['finish_reasons']}; "
        f"{result.generated_tokens} tokens in {result.generation_s:.1f} s = {result.tokens_per_s:.1f} tokens/s"
    )
    if result.held_out is not None:
        h = result.held_out
        console.print(f"held-out: id overlap {h['id_overlap']}, question overlap {h['question_overlap']} of "
                      f"{h['eval_items']} items")  # fmt: skip
        unseen = h.get("unseen_metrics")
        if unseen is not None:
            console.print(f"unseen questions only: {unseen['n_items']} items, mean@{k} {unseen['mean_at_k']:.3f}, "
                          f"pass@{k} {unseen['pass_at_k']:.3f}, maj@{k} {unseen['maj_at_k']:.3f}")  # fmt: skip
        if "warning" in h:
            console.print(f"[yellow]warning:[/yellow] {h['warning']}")


def main(argv: list[str] | None = None) -> int:
    """Parse, evaluate, write the JSON result; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "eval")
    console = Console(stderr=True)
    try:
        result = run(args)
    except (ValueError, ConfigError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    text = json.dumps(result.to_dict(not args.no_items, args.responses), indent=2, ensure_ascii=False)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    print_summary(result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
