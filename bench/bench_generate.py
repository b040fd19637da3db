"""Benchmark the hf backend's sampling loop against bare `model.generate` on the reference generation workload.

Workload (PERFORMANCE.md): the default model, 4 chain_sum-like prompts with one worked example × 4 samples,
64 new tokens at most, temperature 1.0, no truncation. The two samplers run alternately so machine drift hits both.

Run: .venv/bin/python bench/bench_generate.py [--runs 3] [--threads 2]
Writes bench/results/generate.json. Reference: bare `model.generate` took 11.65 s per batch on this machine class.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import write_result

from rollout_server.backends.hf import HFBackend
from rollout_server.backends.sampling import left_pad
from services.modeling.loading import DEFAULT_MODEL
from services.protocol import Sampling

PROMPTS_PER_BATCH = 4
SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 64
REFERENCE_GENERATE_S = 11.65
TERMS = [(3, 5), (7, 2), (4, 4), (9, 6)]

QUESTION = "State the final answer to the following arithmetic problem: {a} + {b} ="
INSTRUCTION = (
    "Solve the problem and put the final answer in \\boxed{{}}.\n\nExample:\n{example}\n\nNow solve:\n{question}"
)
EXAMPLE = QUESTION.format(a=2, b=6) + "\nAnswer: 2 + 6 = 8, so the answer is \\boxed{8}."


def chain_sum_prompts() -> list[list[dict[str, str]]]:
    """Chat prompts in the shape of reasoning-gym chain_sum with two single-digit terms and one worked example."""
    return [
        [{"role": "user", "content": INSTRUCTION.format(example=EXAMPLE, question=QUESTION.format(a=a, b=b))}]
        for a, b in TERMS
    ]


def boxed_correct_share(texts: list[str]) -> float:
    """Share of completions whose first \\boxed{} holds the right sum (prompt order, n per prompt)."""
    correct = 0
    for i, text in enumerate(texts):
        a, b = TERMS[i // SAMPLES_PER_PROMPT]
        match = re.search(r"\\boxed\{\s*(-?\d+)\s*\}", text)
        correct += bool(match and int(match.group(1)) == a + b)
    return correct / len(texts)


def run_backend(backend: HFBackend, prompts: list[list[dict[str, str]]], seed: int) -> dict[str, float]:
    """Time one generate call of the backend and count what it produced."""
    sampling = Sampling(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=seed)
    start = time.perf_counter()
    groups = backend.generate(prompts, n=SAMPLES_PER_PROMPT, sampling=sampling)
    seconds = time.perf_counter() - start
    completions = [c for g in groups for c in g.completions]
    return {
        "seconds": seconds,
        "tokens": sum(len(c.token_ids) for c in completions),
        "correct_share": boxed_correct_share([c.text for c in completions]),
    }


@torch.inference_mode()
def bare_generate(
    backend: HFBackend, prompts: list[list[dict[str, str]]], samples: int, max_new_tokens: int, seed: int
) -> tuple[float, int, list[str]]:
    """Time `model.generate` on prompts x samples, left-padded into one batch: (seconds, tokens, texts)."""
    prompt_ids = [ids for ids in backend.encode_prompts(prompts) for _ in range(samples)]
    pad_id = backend.tokenizer.pad_token_id
    input_ids, mask = left_pad(prompt_ids, pad_id, backend.device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    output = backend.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,  # transformers' default top_k=50 would truncate
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
    )
    seconds = time.perf_counter() - start
    new = output[:, input_ids.shape[1] :]
    # Tokens up to and including the first EOS; later positions are padding written while others decoded.
    finished = torch.isin(new, torch.tensor(sorted(backend.eos_token_ids), device=new.device))
    after_eos = (finished.long().cumsum(-1) - finished.long()) > 0
    texts = backend.tokenizer.batch_decode(new.masked_fill(after_eos, pad_id), skip_special_tokens=True)
    return seconds, int((~after_eos).sum()), texts


def run_bare_generate(backend: HFBackend, prompts: list[list[dict[str, str]]], seed: int) -> dict[str, float]:
    """Time `model.generate` on the reference workload's batch."""
    seconds, tokens, texts = bare_generate(backend, prompts, SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, seed)
    return {"seconds": seconds, "tokens": tokens, "correct_share": boxed_correct_share(texts)}


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds per batch, tokens per second and decode-slot use over the timed runs."""
    seconds = statistics.median(r["seconds"] for r in runs)
    tokens = statistics.median(r["tokens"] for r in runs)
    slots = PROMPTS_PER_BATCH * SAMPLES_PER_PROMPT * MAX_NEW_TOKENS
    return {
        "seconds_per_batch_median": round(seconds, 3),
        "seconds_per_batch_all": [round(r["seconds"], 3) for r in runs],
        "tokens_per_batch_median": tokens,
        "tokens_per_second": round(sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs), 2),
        "decode_slot_use": round(tokens / slots, 3),
        "boxed_correct_share_mean": round(statistics.mean(r["correct_share"] for r in runs), 3),
    }


def main() -> None:
    """Measure both samplers alternately and write bench/results/generate.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed batches per sampler (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    backend = HFBackend(DEFAULT_MODEL, num_threads=args.threads)
    prompts = chain_sum_prompts()
    run_backend(backend, prompts, seed=1000)  # warm-up
    run_bare_generate(backend, prompts, seed=0)
    ours, bare = [], []
    for seed in range(args.runs):
        ours.append(run_backend(backend, prompts, seed))
        bare.append(run_bare_generate(backend, prompts, seed))
        print(f"run {seed}: hf backend {ours[-1]['seconds']:.2f} s, model.generate {bare[-1]['seconds']:.2f} s")
    hf_figures, bare_figures = summarise(ours), summarise(bare)
    figures = {
        "workload": {
            "model": DEFAULT_MODEL,
            "prompts": PROMPTS_PER_BATCH,
            "samples_per_prompt": SAMPLES_PER_PROMPT,
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 1.0,
            "runs": args.runs,
        },
        "hf_backend": hf_figures,
        "bare_generate": bare_figures,
        "speedup_vs_bare_generate": round(
            bare_figures["seconds_per_batch_median"] / hf_figures["seconds_per_batch_median"], 2
        ),
        "reference_bare_generate_s": REFERENCE_GENERATE_S,
    }
    path = write_result("generate", figures)
    print(f"hf backend {hf_figures['seconds_per_batch_median']} s/batch, {hf_figures['tokens_per_second']} tok/s; ")
    print(f"model.generate {bare_figures['seconds_per_batch_median']} s/batch; wrote {path}")


if __name__ == "__main__":
    main()
