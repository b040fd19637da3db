"""TRL's GRPOTrainer on the quick-start workload, timed per step: the TRL side of `make bench-trl`.

Runs under the TRL virtualenv (scripts/setup_trl.sh), never under the project's: it imports nothing of dipo.
bench/bench_trl.py exports the project's own prompts (chat messages with one worked example, gold answer) to a
JSONL file in the feeder's epoch-0 order and passes it here with the local model folder, so both sides train on the
same items in the same order.

Per step: 4 prompts x 4 completions (per_device_train_batch_size=16 completions, num_generations=4,
generation_batch_size=16, so one generation call and one optimizer step per global step), 64 new tokens at most,
temperature 1.0, DAPO loss with eps 0.2 / 0.28, no KL (beta=0), lr 1e-6 constant, fp32 on CPU, no vLLM.

Timing: a TrainerCallback stamps each global step's end (the wall time of step k is the interval between the ends
of steps k-1 and k, like the dipo side's metrics.jsonl stamps), and a GRPOTrainer subclass times
`_generate_and_score_completions` (generation, reward, advantages) and `_generate` (the sampling alone) inside it;
training = step wall - generation-and-scoring. Peak RSS is this process's ru_maxrss.

Usage: python bench/trl_grpo.py --model DIR --data items.jsonl --steps 8 --out result.json --output-dir TMP
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PROMPTS_PER_STEP = 4
SAMPLES_PER_PROMPT = 4
MAX_COMPLETION_TOKENS = 64
TEMPERATURE = 1.0
LEARNING_RATE = 1e-6
EPS_LOW = 0.2
EPS_HIGH = 0.28
MAX_ANSWER_CHARS = 1_000


def _closing_brace(text: str, open_at: int) -> int:
    """Index of the brace closing the one at `open_at` (escaped braces do not count), or -1."""
    depth = 0
    j = open_at
    while j < len(text):
        char = text[j]
        if char == "\\":
            j += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def last_boxed(text: str) -> str | None:
    """Body of the last closed ``\\boxed{...}`` in `text`, or None (a truncated last box counts as no answer)."""
    start = text.rfind("\\boxed")
    while start >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _closing_brace(text, i)
            return text[i + 1 : end] if end >= 0 else None
        start = text.rfind("\\boxed", 0, start)
    return None


def _completion_text(completion: Any) -> str:
    """A TRL completion is a string, or (conversational prompts) a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def boxed_correct_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the last \\boxed{} of a completion equals the gold answer under math-verify, else 0.0.

    Model output is only parsed (math-verify's LaTeX/expression parsers), never evaluated as code.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        body = last_boxed(_completion_text(completion))
        if body is None or not body.strip() or len(body) > MAX_ANSWER_CHARS:
            rewards.append(0.0)
            continue
        try:
            gold_parsed = parse(f"\\boxed{{{gold}}}", config)
            answer_parsed = parse(f"\\boxed{{{body}}}", config)
            rewards.append(1.0 if gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed) else 0.0)
        except Exception:  # math-verify raises on odd input; an unparsable answer is a wrong one
            rewards.append(0.0)
    return rewards


def read_items(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows.append({"prompt": row["messages"], "answer": str(row["answer"]), "item_id": row["item_id"]})
    if not rows:
        raise SystemExit(f"{path} holds no items")
    return rows


def _number(value: Any) -> Any:
    """A logged value as a JSON-able number when it is one (transformers may hand the logs over formatted)."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="local Hugging Face model folder")
    parser.add_argument("--data", required=True, type=Path, help="JSONL of {item_id, messages, answer}")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--out", required=True, type=Path, help="result JSON file")
    parser.add_argument("--output-dir", required=True, type=Path, help="scratch folder for the trainer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    started_wall = time.time()
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    t_imported = time.perf_counter()

    timings: dict[str, float] = {"generate": 0.0, "generate_and_score": 0.0, "generate_calls": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
        """GRPOTrainer with wall-clock timers around its generation step (TRL only logs these to W&B/MLflow)."""

        def _generate(self, prompts):  # type: ignore[no-untyped-def]
            begin = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                timings["generate"] += time.perf_counter() - begin
                timings["generate_calls"] += 1

        def _generate_and_score_completions(self, inputs):  # type: ignore[no-untyped-def]
            begin = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                timings["generate_and_score"] += time.perf_counter() - begin

    steps: list[dict[str, Any]] = []
    logs_by_step: dict[int, dict[str, Any]] = {}

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.train_begin = 0.0
            self.step_begin = 0.0
            self.last_end = 0.0
            self.snapshot = dict(timings)

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.train_begin = self.last_end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.step_begin = time.perf_counter()
            self.snapshot = dict(timings)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            now = time.perf_counter()
            generate = timings["generate"] - self.snapshot["generate"]
            gen_score = timings["generate_and_score"] - self.snapshot["generate_and_score"]
            wall = now - self.last_end
            steps.append(
                {
                    "step": int(state.global_step),
                    "wall_seconds": wall,
                    "inner_seconds": now - self.step_begin,
                    "generate_seconds": generate,
                    "generate_and_score_seconds": gen_score,
                    "training_seconds": wall - gen_score,
                    "generate_calls": int(timings["generate_calls"] - self.snapshot["generate_calls"]),
                    "elapsed_s": now - self.train_begin,
                    "rss_max_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                }
            )
            self.last_end = now
            print(
                f"trl step {state.global_step}: {wall:.1f} s (generation {gen_score:.1f} s, "
                f"training {wall - gen_score:.1f} s)",
                flush=True,
            )

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs:
                # The end-of-training summary (train_runtime, ...) comes with the last step's number: merge it.
                logs_by_step.setdefault(int(state.global_step), {}).update({k: _number(v) for k, v in logs.items()})

    rows = read_items(args.data)
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t_loaded = time.perf_counter()

    batch = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
    config = GRPOConfig(
        output_dir=str(args.output_dir),
        # One global step = one generation of 4 prompts x 4 completions and one optimizer update on all 16.
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=SAMPLES_PER_PROMPT,
        generation_batch_size=batch,
        max_completion_length=MAX_COMPLETION_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        loss_type="dapo",
        epsilon=EPS_LOW,
        epsilon_high=EPS_HIGH,
        beta=0.0,
        num_iterations=1,
        scale_rewards="group",
        use_cpu=True,
        use_vllm=False,
        bf16=False,
        fp16=False,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        shuffle_dataset=False,  # the items come in the dipo feeder's order
        seed=args.seed,
        dataloader_num_workers=0,
        log_completions=False,
        disable_tqdm=True,
    )
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=[boxed_correct_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    t_ready = time.perf_counter()
    trainer.train()
    t_done = time.perf_counter()

    for entry in steps:
        log = logs_by_step.get(entry["step"], {})
        entry["log"] = log
        entry["reward_mean"] = log.get("reward")
        entry["completion_mean_length"] = log.get("completions/mean_length")
    later = [s for s in steps if s["step"] >= 2] or steps
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "side": "trl",
        "measured_at": dt.datetime.fromtimestamp(started_wall, dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
            "math_verify": metadata.version("math-verify"),
        },
        "torch_threads": torch.get_num_threads(),
        "model": str(args.model),
        "data": str(args.data),
        "workload": {
            "prompts_per_step": PROMPTS_PER_STEP,
            "samples_per_prompt": SAMPLES_PER_PROMPT,
            "completions_per_step": batch,
            "max_completion_length": MAX_COMPLETION_TOKENS,
            "temperature": TEMPERATURE,
            "learning_rate": LEARNING_RATE,
            "loss_type": "dapo",
            "epsilon": EPS_LOW,
            "epsilon_high": EPS_HIGH,
            "beta": 0.0,
            "dtype": "float32",
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "generation_batch_size": config.generation_batch_size,
            "steps_per_generation": config.steps_per_generation,
            "num_generations": config.num_generations,
        },
        "steps_requested": args.steps,
        "steps": steps,
        "summary": {
            "median_step_seconds": median_or_none([s["wall_seconds"] for s in later]),
            "median_generation_seconds": median_or_none([s["generate_and_score_seconds"] for s in later]),
            "median_generate_only_seconds": median_or_none([s["generate_seconds"] for s in later]),
            "median_training_seconds": median_or_none([s["training_seconds"] for s in later]),
            "median_over_steps": [s["step"] for s in later],
            "completions_per_second": (
                batch / statistics.median([s["wall_seconds"] for s in later]) if later else None
            ),
            "peak_rss_bytes": peak_rss,
            "import_seconds": t_imported - t_start,
            "load_seconds": t_loaded - t_imported,
            "trainer_init_seconds": t_ready - t_loaded,
            "train_seconds": t_done - t_ready,
            "total_seconds": time.perf_counter() - t_start,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"trl: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
