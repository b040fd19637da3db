"""Benchmark ``Trainer.train_step`` on the reference training workload: the learner step's parts, as ratios.

Workload (PERFORMANCE.md): the quick start's (configs/quickstart.yaml): the default model, its first 4 reasoning-gym
chain_sum prompts with one worked example (~110 tokens) in the chat template × 4 samples, responses sampled once
with ``model.generate`` (64 new tokens at most, temperature 1.0), DAPO loss with correction=tis, lr 1e-6. Every
configuration runs in subprocesses of its own, so that its peak RSS is its own, and the configurations take turns
(``--rounds``), so that a change in the machine's load hits all of them alike:

- ``previous``: the step as it was before the shared prefix (one padded sequence per sample, full-vocabulary logits
  of the response positions, a separate proximal forward): ``shared_prefix=false``, ``head_chunk_tokens=0``,
  ``proximal_forward=always``;
- ``default``: the defaults (shared prefix with packed rows, chunked head, single-pass proximal log-probs);
- ``unshared``: the defaults without the shared prefix (forward + backward with vs without it);
- ``two_pass``: the defaults with the separate proximal forward (the step with vs without it);
- ``rows_per_group``: the defaults with one group per row (``pack_row_tokens=0``): the packing policy;
- ``plain_head``: the defaults with all logits of the response positions at once (``head_chunk_tokens=0``);
- ``default_gc``: the defaults with gradient checkpointing;
- ``minibatches4``: the defaults with 4 PPO mini-batches (a proximal pass for 3 of them, 4 AdamW updates);
- ``bare``: one forward over every position (full-vocabulary logits), a token-mean policy-gradient loss, backward,
  AdamW: the "bare forward + backward + AdamW on the 16 sequences" of PERFORMANCE.md.

Run: .venv/bin/python bench/bench_train.py [--rounds 3] [--warmup 1] [--threads 2] [--modes default,unshared]
Writes bench/results/train.json (only when every mode ran).
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _common import write_result

from learner.advantages import group_advantages
from learner.batch import Sample, decode_samples, encode_samples
from learner.data import load_items
from learner.distributed import DistInfo
from learner.losses import score_responses
from learner.packing import pad_samples
from learner.train import Trainer
from services.config import RunConfig, load_config
from services.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
PROMPTS = 4
SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 64
REWARDS = ([1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0])
"""Mixed groups, so every response carries a non-zero advantage."""
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PREVIOUS = {"shared_prefix": False, "head_chunk_tokens": 0, "proximal_forward": "always"}
MODES: dict[str, dict[str, Any] | None] = {
    "previous": PREVIOUS,
    "default": {},
    "unshared": {"shared_prefix": False},
    "two_pass": {"proximal_forward": "always"},
    "rows_per_group": {"pack_row_tokens": 0},
    "plain_head": {"head_chunk_tokens": 0},
    "default_gc": {"gradient_checkpointing": True},
    "minibatches4": {"minibatches": 4},
    "bare": None,
}
"""Learner overrides of each configuration (None: the bare step, no Trainer)."""


def build_samples(seed: int = 0) -> list[Sample]:
    """Prompts in the chat template, responses sampled once by the model, behaviour log-probs, advantages."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    eos = tokenizer.eos_token_id
    samples = []
    torch.manual_seed(seed)
    items = load_items(load_config(QUICKSTART, [], environ={}).data)[:PROMPTS]
    for g, item in enumerate(items):
        prompt = tokenizer.apply_chat_template(
            item.messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
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
    padded = pad_samples(samples, CPU.device)
    with torch.no_grad():
        logp, _ = score_responses(model, padded.input_ids, padded.attention_mask, padded.response_mask)
    return [
        Sample(s.group_id, s.prompt_ids, s.response_ids, logp[i, : len(s.response_ids)].numpy().astype(np.float32),
               s.advantage, s.temperature, s.version)
        for i, s in enumerate(samples)
    ]  # fmt: skip


def stretch(sample: Sample, total: int) -> Sample:
    """Extend the response with repeated tokens so prompt + response is ``total`` tokens (a fixed-shape batch)."""
    extra = max(0, total - len(sample.prompt_ids) - len(sample.response_ids))
    response = np.concatenate([sample.response_ids, np.full(extra, sample.response_ids[-1], np.uint32)])
    logprobs = np.concatenate([sample.behaviour_logprobs, np.full(extra, -1.0, np.float32)])
    return Sample(sample.group_id, sample.prompt_ids, response, logprobs, sample.advantage, sample.temperature,
                  sample.version)  # fmt: skip


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, samples: list[Sample]) -> None:
    """Forward over every position (full logits), token-mean policy-gradient loss, backward, AdamW."""
    batch = pad_samples(samples, CPU.device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask[:, 1:]
    loss = -(logp * batch.advantages.unsqueeze(1) * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(mode: str, samples_file: Path, runs: int, threads: int, warmup: int) -> dict[str, Any]:
    """Time `runs` steps of one configuration in this process after `warmup` untimed ones (the first step also
    allocates AdamW's state and warms the allocator); return seconds, phases and peak RSS."""
    torch.set_num_threads(threads)
    samples = decode_samples(samples_file.read_bytes())
    model = load_model(DEFAULT_MODEL)
    overrides = MODES[mode]
    seconds, phases, positions = [], [], 0
    if overrides is None:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        before = peak_rss_gib()
        for i in range(warmup + runs):
            start = time.perf_counter()
            bare_step(model, optimizer, samples)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
        positions = int(pad_samples(samples, CPU.device).input_ids.numel())
    else:
        cfg = RunConfig.model_validate({"learner": {"lr": 1e-6, "correction": "tis", **overrides}})
        trainer = Trainer(cfg, model, CPU)
        positions = sum(b.positions for mb in trainer.plan(samples) for b in mb.batches)
        before = peak_rss_gib()
        for i in range(warmup + runs):
            metrics = trainer.train_step(samples)
            if i >= warmup:
                seconds.append(metrics["step_seconds"])
                phases.append({k: metrics[k] for k in ("proximal_seconds", "forward_backward_seconds", "updates")})
    return {"seconds": seconds, "phases": phases, "positions": positions, "rss_before_gib": before,
            "peak_rss_gib": peak_rss_gib()}  # fmt: skip


def run_modes(
    modes: list[str], samples: list[Sample], rounds: int, runs: int, threads: int, warmup: int
) -> dict[str, Any]:
    """Run every mode `rounds` times in turn, each time in a fresh subprocess; merge each mode's results."""
    merged: dict[str, dict[str, Any]] = {m: {"seconds": [], "phases": [], "peak_rss_gib": 0.0} for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        samples_file = Path(tmp) / "samples.msgpack"
        samples_file.write_bytes(encode_samples(samples))
        for r in range(rounds):
            for mode in modes:
                cmd = [sys.executable, __file__, "--worker", mode, "--samples-file", str(samples_file)]
                cmd += ["--runs", str(runs), "--threads", str(threads), "--warmup", str(warmup)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                out = merged[mode]
                out["seconds"] += got["seconds"]
                out["phases"] += got["phases"]
                out["positions"] = got["positions"]
                out["rss_before_gib"] = round(got["rss_before_gib"], 2)
                out["peak_rss_gib"] = round(max(out["peak_rss_gib"], got["peak_rss_gib"]), 2)
                print(f"round {r + 1} {mode}: {[round(s, 2) for s in got['seconds']]} s, "
                      f"peak RSS {got['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
    for out in merged.values():
        # Other work on a shared machine only ever adds time: the minimum is the least disturbed measurement.
        for stat, fn in (("median", statistics.median), ("min", min)):
            out[f"seconds_per_step_{stat}"] = round(fn(out["seconds"]), 3)
            for key in ("proximal_seconds", "forward_backward_seconds"):
                values = [p[key] for p in out["phases"]]
                if values:
                    out[f"{key}_{stat}"] = round(fn(values), 3)
        out["seconds"] = [round(s, 3) for s in out.pop("seconds")]
        out.pop("phases")
    return merged


def ratios(results: dict[str, Any], stat: str) -> dict[str, float]:
    """The figures the learner issue asks for, each measured in this run (PERFORMANCE.md: only those compare), from
    the `stat` ("median" or "min") of each configuration's steps."""

    def r(a: str, b: str, key: str) -> float:
        return round(results[a][key] / results[b][key], 3)

    fb, step = f"forward_backward_seconds_{stat}", f"seconds_per_step_{stat}"
    return {
        "fwd_bwd_shared_vs_unshared": r("default", "unshared", fb),
        "positions_shared_vs_unshared": r("default", "unshared", "positions"),
        "step_single_pass_vs_two_pass": r("default", "two_pass", step),
        "step_default_vs_previous": r("default", "previous", step),
        "fwd_bwd_packed_rows_vs_rows_per_group": r("default", "rows_per_group", fb),
        "fwd_bwd_chunked_vs_plain_head": r("default", "plain_head", fb),
        "step_default_vs_bare": r("default", "bare", step),
    }


def main() -> None:
    """Sample the batch once, measure each configuration in turn, write bench/results/train.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="turns of every configuration (a subprocess each)")
    parser.add_argument("--runs", type=int, default=1, help="timed steps per subprocess")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per subprocess before the timed ones")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated configurations to run")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=0,
                        help="pad every response so prompt+response is this many tokens (0: as sampled)")  # fmt: skip
    parser.add_argument("--samples-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples_file, args.runs, args.threads, args.warmup)))
        return

    torch.set_num_threads(args.threads)
    samples = build_samples()
    if args.seq_len:
        samples = [stretch(s, args.seq_len) for s in samples]
    modes = args.modes.split(",")
    results = run_modes(modes, samples, args.rounds, args.runs, args.threads, args.warmup)
    lengths = [len(s.response_ids) for s in samples]
    figures: dict[str, Any] = {
        "workload": {
            "model": DEFAULT_MODEL,
            "sequences": len(samples),
            "prompt_tokens": [len(s.prompt_ids) for s in samples[::SAMPLES_PER_PROMPT]],
            "response_tokens": lengths,
            "loss": "dapo",
            "correction": "tis",
            "rounds": args.rounds,
            "runs_per_round": args.runs,
            "warmup_per_round": args.warmup,
            "threads": args.threads,
        },
        "modes": {m: MODES[m] for m in modes},
        **results,
    }
    if set(modes) != set(MODES):
        print(json.dumps(figures, indent=2))
        return
    figures["ratios_of_medians"] = ratios(results, "median")
    figures["ratios_of_minima"] = ratios(results, "min")
    figures["peak_rss_default_vs_previous"] = round(
        results["default"]["peak_rss_gib"] / results["previous"]["peak_rss_gib"], 3
    )
    path = write_result("train", figures)
    print(json.dumps({k: figures[k] for k in ("ratios_of_medians", "ratios_of_minima")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
