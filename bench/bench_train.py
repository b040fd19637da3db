"""Benchmark ``Trainer.train_step`` on the reference training workload, against a bare forward + backward + AdamW.

Workload (PERFORMANCE.md): the default model, 4 chain_sum-like prompts with one worked example (~120 tokens) × 4
samples, responses sampled once with ``model.generate`` (64 new tokens at most, temperature 1.0), DAPO loss, lr 1e-6.
Each configuration runs in a subprocess of its own so that its peak RSS is its own:

- ``trainer``: ``train_step`` with correction=tis (includes the proximal forward), no gradient checkpointing;
- ``trainer_gc``: the same with gradient checkpointing;
- ``bare``: one forward over every position (full-vocabulary logits), a token-mean policy-gradient loss, backward,
  AdamW: the "bare forward + backward + AdamW on the 16 sequences" of PERFORMANCE.md (16.5 s there).

Run: .venv/bin/python bench/bench_train.py [--runs 3] [--threads 2]
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _common import write_result
from bench_generate import SAMPLES_PER_PROMPT, chain_sum_prompts

from learner.advantages import group_advantages
from learner.batch import Sample, decode_samples, encode_samples
from learner.distributed import DistInfo
from learner.losses import score_responses
from learner.train import Trainer, collate
from services.config import RunConfig
from services.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer

MAX_NEW_TOKENS = 64
REFERENCE_BARE_STEP_S = 16.5
REWARDS = ([1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0])
"""Mixed groups, so every response carries a non-zero advantage."""
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def build_samples(seed: int = 0) -> list[Sample]:
    """Prompts in the chat template, responses sampled once by the model, behaviour log-probs, advantages."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    eos = tokenizer.eos_token_id
    samples = []
    torch.manual_seed(seed)
    for g, messages in enumerate(chain_sum_prompts()):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = torch.tensor([list(prompt)] * SAMPLES_PER_PROMPT)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=eos,
            )  # fmt: skip
        advantages = group_advantages(np.array(REWARDS[g], dtype=float), np.zeros(SAMPLES_PER_PROMPT), alpha=0.1)
        for row, adv in zip(out[:, ids.shape[1] :].tolist(), advantages, strict=True):
            response = row[: row.index(eos) + 1] if eos in row else row
            samples.append(
                Sample(f"g{g}", np.array(prompt, np.uint32), np.array(response, np.uint32),
                       np.zeros(len(response), np.float32), float(adv), 1.0, 0)
            )  # fmt: skip
    batch = collate(samples, CPU.device)
    with torch.no_grad():
        logp, _ = score_responses(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    return [
        Sample(s.group_id, s.prompt_ids, s.response_ids, logp[i, : len(s.response_ids)].numpy().astype(np.float32),
               s.advantage, s.temperature, s.version)
        for i, s in enumerate(samples)
    ]  # fmt: skip


MODES = ("trainer", "trainer_none", "trainer_gc", "bare")
"""trainer: correction=tis (an extra no-grad forward for the proximal log-probs); trainer_none: the same work as
bare (one forward+backward+AdamW), so their ratio is the learner's overhead."""


def stretch(sample: Sample, total: int) -> Sample:
    """Extend the response with repeated tokens so prompt + response is ``total`` tokens (a fixed-shape batch)."""
    extra = max(0, total - len(sample.prompt_ids) - len(sample.response_ids))
    response = np.concatenate([sample.response_ids, np.full(extra, sample.response_ids[-1], np.uint32)])
    logprobs = np.concatenate([sample.behaviour_logprobs, np.full(extra, -1.0, np.float32)])
    return Sample(sample.group_id, sample.prompt_ids, response, logprobs, sample.advantage, sample.temperature,
                  sample.version)  # fmt: skip


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, samples: list[Sample]) -> None:
    """Forward over every position (full logits), token-mean policy-gradient loss, backward, AdamW."""
    batch = collate(samples, CPU.device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask[:, 1:]
    loss = -(logp * batch.advantages.unsqueeze(1) * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(mode: str, samples_file: Path, runs: int, threads: int) -> dict[str, object]:
    """Time `runs` steps of one configuration in this process; return seconds and peak RSS."""
    torch.set_num_threads(threads)
    samples = decode_samples(samples_file.read_bytes())
    model = load_model(DEFAULT_MODEL)
    seconds, phases = [], []
    if mode == "bare":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        for _ in range(runs):
            start = time.perf_counter()
            bare_step(model, optimizer, samples)
            seconds.append(time.perf_counter() - start)
    else:
        correction = "none" if mode == "trainer_none" else "tis"
        learner = {"lr": 1e-6, "correction": correction, "gradient_checkpointing": mode == "trainer_gc"}
        trainer = Trainer(RunConfig.model_validate({"learner": learner}), model, CPU)
        for _ in range(runs):
            metrics = trainer.train_step(samples)
            seconds.append(metrics["step_seconds"])
            phases.append({k: round(metrics[k], 3) for k in ("proximal_seconds", "forward_backward_seconds")})
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds_per_step_median": round(statistics.median(seconds), 3),
        "seconds_per_step_all": [round(s, 3) for s in seconds],
        "phases": phases,
        "peak_rss_gib": round(peak_kib / 2**20, 2),
    }


def main() -> None:
    """Sample the batch once, measure each configuration in its own subprocess, write bench/results/train.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=0,
                        help="pad every response so prompt+response is this many tokens (0: as sampled)")  # fmt: skip
    parser.add_argument("--samples-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples_file, args.runs, args.threads)))
        return

    torch.set_num_threads(args.threads)
    samples = build_samples()
    if args.seq_len:
        samples = [stretch(s, args.seq_len) for s in samples]
    lengths = [len(s.response_ids) for s in samples]
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        samples_file = Path(tmp) / "samples.msgpack"
        samples_file.write_bytes(encode_samples(samples))
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode, "--samples-file", str(samples_file)]
            cmd += ["--runs", str(args.runs), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{mode}: {results[mode]}")
    trainer_s = results["trainer"]["seconds_per_step_median"]  # type: ignore[index]
    none_s = results["trainer_none"]["seconds_per_step_median"]  # type: ignore[index]
    bare_s = results["bare"]["seconds_per_step_median"]  # type: ignore[index]
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    figures = {
        "workload": {
            "model": DEFAULT_MODEL,
            "sequences": len(samples),
            "prompt_tokens": [len(s.prompt_ids) for s in samples[::SAMPLES_PER_PROMPT]],
            "response_tokens_mean": round(float(np.mean(lengths)), 1),
            "response_tokens_max": max(lengths),
            "loss": "dapo",
            "correction": "tis",
            "runs": args.runs,
            "threads": args.threads,
        },
        **results,
        "tokens_per_step": tokens,
        "tokens_per_s": {m: round(tokens / r["seconds_per_step_median"], 1) for m, r in results.items()},  # type: ignore[index]
        "speedup_trainer_vs_bare": round(bare_s / trainer_s, 2),
        "overhead_trainer_none_vs_bare": round(none_s / bare_s - 1, 3),
        "reference_bare_step_s": REFERENCE_BARE_STEP_S,
    }
    path = write_result("train", figures)
    print(f"train_step {trainer_s} s (tis, incl. proximal pass); bare fwd+bwd+AdamW {bare_s} s; wrote {path}")


if __name__ == "__main__":
    main()
