"""Benchmark ``Trainer.train_step`` on one GPU: a Qwen3-0.6B-shaped policy (random weights), 16k tokens per step.

The model is built from a ``Qwen3Config`` with the published Qwen3-0.6B shapes (nothing is downloaded), in bf16 on
CUDA with ``attn_implementation="sdpa"``. The batch is one micro-batch of 16,384 tokens (``micro_batch_tokens``
16,384) in four layouts: ``8x2048`` (8 sequences of 256 prompt + 1,792 response tokens), ``1x16384`` (one sequence
of 2,048 prompt + 14,336 response tokens, the "16k context" of prime-rl's anchor), ``8xragged`` (8 sequences of 256
prompt + 896..1,792 response tokens: 12,800 real tokens right-padded to 8 × 2,048) and ``4x4grouped`` (4 groups of
4 responses of 768 tokens sharing a 1,024-token prompt: 16,384 positions with the shared prefix, 28,672 without).
Configurations: the learner's defaults (DAPO, correction ``tis`` with its single-pass proximal log-probs, the
chunked log-prob head, the shared prefix), with and without gradient checkpointing; ``none`` (no correction);
``tis_two_pass`` (a separate proximal forward, as before); ``previous`` (no shared prefix, full-vocabulary logits
of the response positions, the separate proximal forward: the learner as it was when ``tis`` measured 66.7 GiB);
the grouped layout with and without the shared prefix; and a bare forward + backward + AdamW (full-vocabulary
logits, HF-style) for scale. Each runs 1 warm-up step and ``--runs`` timed steps; the wall time of a step is taken
with the device synchronised on both ends.

MFU = model FLOPs per step / wall seconds / peak bf16 dense FLOP/s of an H100 SXM (989 TFLOP/s, ``--peak-tflops``).
Model FLOPs (``step_flops``) count matrix products only, causal attention at half of the full S², and NOT the
recomputation of gradient checkpointing (so MFU, not HFU):

- forward: 2·N·T (decoder) + 2·h·V·R (output layer, response positions only) + 2·L·H·d·S² per sequence (QKᵀ and
  AV, each 2·S²·H·d, halved by the causal mask);
- forward + backward: 3 forwards; a separate proximal forward (``tis_two_pass``, ``previous``): one more;

with N the non-embedding parameters, T all tokens, R the response tokens scored, V the vocabulary, h the hidden size,
L layers, H attention heads of dimension d, S each sequence's length. The bare step projects every position (R = T).
With the shared prefix a group's prompt counts once in T, and each response's attention is over its prompt and
itself. Gradient-checkpointing recomputation and the chunked head's recomputed logits are not counted.
Padding is not counted (only real tokens are work). ``mfu_prime_rl_convention`` uses the formula that reproduces
prime-rl's anchor (11.9k tokens/s = 11 % MFU at 16k): (6·N_all·T + 6·L·H·d·ΣS²) / s / peak, N_all including the
embeddings, training forward + backward only (no proximal forward).

Run on a CUDA machine: PYTHONPATH=. python bench/bench_train_gpu.py [--runs 3]   (``--tiny`` smoke-tests on CPU)
Writes bench/results/train_gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _common import write_result
from torch import nn

from learner.batch import Sample
from learner.distributed import DistInfo
from learner.packing import pad_samples
from learner.train import Trainer
from services.config import RunConfig

H100_SXM_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's datasheet figure for dense bf16 tensor-core throughput of an H100 SXM5 (no sparsity)."""
PRIME_RL_ANCHOR = {"tokens_per_s": 11_900, "mfu": 0.11, "what": "prime-rl, Qwen3-0.6B RL, 16k context, one H100"}
MICRO_BATCH_TOKENS = 16_384

QWEN3_0_6B = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151_936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32_768,
}
TINY = {**QWEN3_0_6B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY |= {"num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "max_position_embeddings": 4096}

Layout = tuple[tuple[int, int], ...]
"""A batch layout: (prompt tokens, response tokens) of each sequence."""

LAYOUTS: dict[str, Layout] = {
    "8x2048": ((256, 1792),) * 8,
    "1x16384": ((2048, 14_336),),
    "8xragged": tuple((256, 1792 - 128 * k) for k in range(8)),
    "4x4grouped": ((1024, 768),) * 16,
}
"""Each padded to at most MICRO_BATCH_TOKENS, so every step is one micro-batch (the grouped layout without the
shared prefix: two)."""
TINY_LAYOUTS: dict[str, Layout] = {
    "8x2048": ((16, 112),) * 8,
    "1x16384": ((128, 896),),
    "8xragged": tuple((16, 112 - 8 * k) for k in range(8)),
    "4x4grouped": ((64, 48),) * 16,
}
GROUP_SIZE = {"4x4grouped": 4}
"""Samples per group (one shared prompt) of a layout; 1 where absent: every sample has a prompt of its own."""


PREVIOUS = {"shared_prefix": False, "head_chunk_tokens": 0, "proximal_forward": "always"}
"""The learner before the single pass, the chunked head and the shared prefix."""


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    name: str
    layout: str
    correction: str
    gradient_checkpointing: bool
    bare: bool = False
    learner: tuple[tuple[str, Any], ...] = ()
    """Further learner settings (over the defaults)."""

    @property
    def two_pass(self) -> bool:
        """True when the step runs a separate proximal forward."""
        return self.correction == "tis" and dict(self.learner).get("proximal_forward") == "always"


CASES = (
    Case("tis", "8x2048", "tis", False),
    Case("tis_gc", "8x2048", "tis", True),
    Case("none", "8x2048", "none", False),
    Case("none_gc", "8x2048", "none", True),
    Case("tis_two_pass", "8x2048", "tis", False, learner=(("proximal_forward", "always"),)),
    Case("previous", "8x2048", "tis", False, learner=tuple(PREVIOUS.items())),
    Case("tis_16k_seq", "1x16384", "tis", False),
    Case("tis_gc_16k_seq", "1x16384", "tis", True),
    Case("none_16k_seq", "1x16384", "none", False),
    Case("none_gc_16k_seq", "1x16384", "none", True),
    Case("previous_16k_seq", "1x16384", "tis", False, learner=tuple(PREVIOUS.items())),
    Case("tis_ragged", "8xragged", "tis", False),
    Case("tis_grouped", "4x4grouped", "tis", False),
    Case("tis_grouped_unshared", "4x4grouped", "tis", False, learner=(("shared_prefix", False),)),
    Case("bare_fwd_bwd_adamw", "8x2048", "none", False, bare=True),
)


def build_model(shapes: dict[str, Any], device: torch.device) -> nn.Module:
    """A Qwen3ForCausalLM with random weights, built directly on `device` in bf16 (no download)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**shapes)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


def build_samples(layout: Layout, vocab: int, group_size: int = 1, seed: int = 0) -> list[Sample]:
    """Random prompts (one per `group_size` samples) and responses; behaviour log-probs near a uniform policy's, so
    ratios sit near 1."""
    rng = np.random.default_rng(seed)
    uniform = -float(np.log(vocab))
    samples = []
    prompt = np.zeros(0, np.uint32)
    for i, (prompt_len, response_len) in enumerate(layout):
        if i % group_size == 0:
            prompt = rng.integers(0, vocab, prompt_len, dtype=np.uint32)
        response = rng.integers(0, vocab, response_len, dtype=np.uint32)
        behaviour = (uniform + rng.normal(0.0, 0.05, response_len)).astype(np.float32)
        group = f"g{i // group_size}"
        samples.append(Sample(group, prompt, response, behaviour, 1.0 if i % 2 == 0 else -1.0, 1.0, 0))
    return samples


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters); the tied embedding/output matrix counts once."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def attention_flops(shapes: dict[str, Any], layout: Layout, group_size: int = 1) -> float:
    """Forward FLOPs of QKᵀ and AV over every layer and sequence, halved by the causal mask: 2·L·H·d·ΣS²; with a
    shared prefix (group_size > 1) each group's prompt attends once and each response over its prompt and itself."""
    width = shapes["num_hidden_layers"] * shapes["num_attention_heads"] * shapes["head_dim"]
    pairs = sum((p + r) ** 2 for p, r in layout)
    if group_size > 1:
        prompts = layout[::group_size]
        pairs -= sum((group_size - 1) * p**2 for p, _ in prompts)
    return 2.0 * width * pairs


def layout_tokens(layout: Layout, group_size: int = 1) -> int:
    """Positions of real tokens in a layout: with a shared prefix, each group's prompt once."""
    return sum(r for _, r in layout) + sum(p for p, _ in layout[::group_size])


def step_flops(shapes: dict[str, Any], non_embedding: int, layout: Layout, case: Case) -> float:
    """Model FLOPs of one optimizer step (see the module docstring); recomputation is not counted."""
    group = group_size(case)
    tokens = layout_tokens(layout, group)
    scored = tokens if case.bare else sum(r for _, r in layout)
    forward = 2.0 * non_embedding * tokens + 2.0 * shapes["hidden_size"] * shapes["vocab_size"] * scored
    forwards = 4 if case.two_pass else 3  # backward = 2 forwards; a separate proximal pass adds one
    return forwards * (forward + attention_flops(shapes, layout, group))


def group_size(case: Case) -> int:
    """Samples that share a computed prompt in the case: its layout's groups, unless the shared prefix is off."""
    shared = dict(case.learner).get("shared_prefix", True) and not case.bare
    return GROUP_SIZE.get(case.layout, 1) if shared else 1


def prime_rl_flops(shapes: dict[str, Any], parameters: int, layout: Layout) -> float:
    """Training FLOPs under the convention that reproduces prime-rl's anchor: 6·N_all·T + 6·L·H·d·ΣS²."""
    return 6.0 * parameters * sum(p + r for p, r in layout) + 3.0 * attention_flops(shapes, layout)


def bare_step(model: nn.Module, optimizer: torch.optim.Optimizer, samples: list[Sample], device: torch.device) -> None:
    """Forward over every position (full-vocabulary logits), token-mean policy-gradient loss, backward, AdamW."""
    batch = pad_samples(samples, device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask[:, 1:]
    loss = -(logp * batch.advantages.unsqueeze(1) * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(step: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of one step with the device idle before and after it, and the step's metrics if any."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    metrics = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, metrics


def make_step(case: Case, shapes: dict[str, Any], layouts: dict[str, Layout], dev: DistInfo) -> Callable[[], Any]:
    """Build a fresh model (and trainer) for the case; return a function that runs one optimizer step."""
    device = dev.device
    model = build_model(shapes, device)
    samples = build_samples(layouts[case.layout], shapes["vocab_size"], GROUP_SIZE.get(case.layout, 1))
    if case.bare:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

        def step() -> dict[str, float] | None:
            bare_step(model, optimizer, samples, device)
            return None
    else:
        learner = {
            "lr": 1e-6,
            "loss": "dapo",
            "correction": case.correction,
            "gradient_checkpointing": case.gradient_checkpointing,
            "micro_batch_tokens": MICRO_BATCH_TOKENS,
            "device": str(device),
            **dict(case.learner),
        }
        longest = max(r for _, r in layouts[case.layout])
        cfg = RunConfig.model_validate({"learner": learner, "sampling": {"max_new_tokens": longest}})
        trainer = Trainer(cfg, model, dev)

        def step() -> dict[str, float] | None:
            return trainer.train_step(samples)

    return step


def run_case(
    case: Case, shapes: dict[str, Any], layouts: dict[str, Layout], runs: int, dev: DistInfo
) -> dict[str, Any]:
    """Run 1 warm-up + `runs` timed steps of a fresh model; return seconds, phases and peak memory."""
    device = dev.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(case, shapes, layouts, dev)
    timings = [timed(step, device) for _ in range(runs + 1)][1:]  # the first is the warm-up
    seconds = [s for s, _ in timings]
    phases = [
        {k: round(m[k], 4) for k in ("proximal_seconds", "forward_backward_seconds", "step_seconds", "updates")}
        for _, m in timings
        if m is not None
    ]
    result: dict[str, Any] = {
        "seconds_per_step_median": round(statistics.median(seconds), 4),
        "seconds_per_step_all": [round(s, 4) for s in seconds],
        "phases": phases,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return result


def print_profile(case: Case, shapes: dict[str, Any], layouts: dict[str, Layout], dev: DistInfo) -> None:
    """Print the kernels and operators that take the most device time in one step (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(case, shapes, layouts, dev)
    timed(step, dev.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed(step, dev.device)
    sort_by = "self_cuda_time_total" if dev.device.type == "cuda" else "self_cpu_time_total"
    print(
        f"profile of {case.name}:\n{prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60)}"
    )


def measured_matmul_tflops(device: torch.device) -> float | None:
    """bf16 8192³ matrix-product throughput on this device: the practical ceiling beside the datasheet's."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    def products() -> None:
        for _ in range(10):
            a @ b

    products()  # warm-up
    seconds, _ = timed(products, device)
    return round(10 * 2 * 8192**3 / seconds / 1e12, 1)


def throughput(
    result: dict[str, Any], flops: tuple[float, float], layout: Layout, peak_tflops: float, group: int = 1
) -> None:
    """Add tokens/s (all real tokens as sequences, positions computed, response tokens), achieved TFLOP/s and both
    MFUs to a case's result."""
    ours, prime = flops
    seconds = result["seconds_per_step_median"]
    result["tokens_per_s"] = round(sum(p + r for p, r in layout) / seconds)  # as sequences: prompts once per sample
    result["computed_tokens_per_s"] = round(layout_tokens(layout, group) / seconds)  # a shared prompt once
    result["response_tokens_per_s"] = round(sum(r for _, r in layout) / seconds)
    result["model_tflop_per_step"] = round(ours / 1e12, 2)
    result["achieved_tflops"] = round(ours / seconds / 1e12, 1)
    result["mfu"] = round(ours / seconds / (peak_tflops * 1e12), 4)
    result["mfu_prime_rl_convention"] = round(prime / seconds / (peak_tflops * 1e12), 4)


def main() -> None:
    """Measure every case on the GPU (or the tiny model on CPU with --tiny) and write bench/results/train_gpu.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS, help="peak for MFU")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch on CPU: a smoke test, no result")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    parser.add_argument("--profile", default="", help="comma-separated cases whose step to profile (a table on stdout)")
    args = parser.parse_args()
    shapes, layouts = (TINY, TINY_LAYOUTS) if args.tiny else (QWEN3_0_6B, LAYOUTS)
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dev = DistInfo(rank=0, world_size=1, local_rank=0, device=device)

    total, non_embedding = param_counts(build_model(shapes, torch.device("meta")))
    results: dict[str, Any] = {}
    for case in (c for c in CASES if c.name in args.cases.split(",")):
        try:
            result = run_case(case, shapes, layouts, args.runs, dev)
            layout = layouts[case.layout]
            flops = step_flops(shapes, non_embedding, layout, case), prime_rl_flops(shapes, total, layout)
            throughput(result, flops, layout, args.peak_tflops, group_size(case))
        except torch.OutOfMemoryError as exc:
            result = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        results[case.name] = {**case.__dict__, **result}
        print(f"{case.name}: {results[case.name]}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for case in (c for c in CASES if c.name in args.profile.split(",")):
        print_profile(case, shapes, layouts, dev)

    figures = {
        "workload": {
            "model": "Qwen3-0.6B shapes, random weights (Qwen3Config), bf16 parameters and AdamW states",
            "shapes": shapes,
            "parameters": total,
            "non_embedding_parameters": non_embedding,
            "layouts": {k: {"prompt": [p for p, _ in v], "response": [r for _, r in v]} for k, v in layouts.items()},
            "micro_batch_tokens": MICRO_BATCH_TOKENS,
            "loss": "dapo",
            "attn_implementation": "sdpa",
            "runs": args.runs,
            "warmup_runs": 1,
        },
        "mfu_assumption": f"peak bf16 dense {args.peak_tflops} TFLOP/s (H100 SXM datasheet); model FLOPs only",
        "flops_formula": (
            "forward = 2*N_nonembed*T + 2*h*V*R + 2*L*H*d*S^2 per sequence (causal half of QK^T and AV); "
            "step = 3 forwards (forward + backward) + 1 more with a separate proximal pass; "
            "R = response tokens (all tokens for the bare step); T counts a shared prompt once; "
            "gradient-checkpointing and chunked-head recompute not counted"
        ),
        "matmul_bf16_8192_tflops_measured": measured_matmul_tflops(device),
        "reference": PRIME_RL_ANCHOR,
        **results,
    }
    if args.tiny:
        print(figures)
        return
    path = write_result("train_gpu", figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
