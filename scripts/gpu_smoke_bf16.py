"""Manual GPU check of the learner's mixed precision: float32 master weights and AdamW state, bf16 forward.

Why it exists: at RL learning rates (~1e-6) one AdamW update (about lr per element) is far below the rounding step of
a bf16 parameter (~2^-8 of its value), so pure-bf16 parameters barely move; the learner therefore keeps float32
parameters and, with ``model.dtype=bfloat16`` on one CUDA device, runs the forward under ``torch.autocast``
(``PolicyScorer.autocast_dtype``). This script trains a random Qwen3 (Qwen3-0.6B shapes unless shrunk, nothing is
downloaded) for a few ``Trainer.train_step`` calls on one fixed batch (DAPO loss, ``correction=tis``, lr 1e-6) in
each mode and prints a JSON summary:

- ``autocast``: float32 parameters, ``model.dtype=bfloat16``: float32 masters, bf16 compute (the learner's default
  on CUDA);
- ``pure_bf16``: parameters cast to bfloat16 (``model.to(torch.bfloat16)``, no autocast), for comparison;
- ``fp32``: float32 parameters and compute (``model.dtype=float32``), for reference (``--modes`` to add it).

Per mode: parameter dtypes after the steps; the share of parameter elements the first step and all steps changed
(overall, in matrices and in 1-D norm weights); the output dtypes seen at a decoder layer (its residual stream stays
float32 under autocast), at a linear layer inside it and at the output layer (the logits), in the training forward
and in the proximal (no-grad) forward; per-step wall seconds and the trainer's metrics; peak GPU memory. On CUDA the
script checks that autocast keeps float32 parameters, computes the logits in bf16 and changes most elements in one
step, and that pure bf16 changes far fewer; it exits with status 1 if a check fails.

Run on a CUDA machine:  PYTHONPATH=. python scripts/gpu_smoke_bf16.py [--layers 28] [--modes autocast,pure_bf16]
``--tiny --device cpu`` runs a tiny model on CPU: autocast is CUDA-only in the learner, so that only smoke-tests the
plumbing and skips the checks.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from learner.batch import Sample
from learner.distributed import DistInfo
from learner.train import Trainer
from services.config import RunConfig

QWEN3_0_6B: dict[str, Any] = {
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
TINY: dict[str, Any] = QWEN3_0_6B | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
}
MODES = ("autocast", "pure_bf16", "fp32")
LR = 1e-6


def build_model(shapes: dict[str, Any], device: torch.device, seed: int) -> nn.Module:
    """A Qwen3ForCausalLM with random weights in float32 on `device` (no download)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    with device:
        return AutoModelForCausalLM.from_config(Qwen3Config(**shapes), dtype=torch.float32, attn_implementation="sdpa")


def build_samples(n: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> list[Sample]:
    """A fixed batch of random sequences; behaviour log-probs near a uniform policy's, advantages ±1."""
    rng = np.random.default_rng(seed)
    uniform = -float(np.log(vocab))
    samples = []
    for i in range(n):
        prompt = rng.integers(0, vocab, prompt_len, dtype=np.uint32)
        response = rng.integers(0, vocab, response_len, dtype=np.uint32)
        behaviour = (uniform + rng.normal(0.0, 0.05, response_len)).astype(np.float32)
        samples.append(Sample(f"g{i // 4}-{i}", prompt, response, behaviour, 1.0 if i % 2 == 0 else -1.0, 1.0, 0, True))
    return samples


def make_cfg(mode: str, samples: list[Sample], device: torch.device) -> RunConfig:
    """The run config of a mode: DAPO, correction=tis, lr 1e-6, the whole batch in one micro-batch."""
    learner = {
        "lr": LR,
        "loss": "dapo",
        "correction": "tis",
        "micro_batch_tokens": max(64, sum(s.length for s in samples)),
        "device": str(device),
        # The dtype probes hook the output layer's forward in a training and a no-grad pass: keep the plain head
        # (the chunked one multiplies by its weight directly) and the separate proximal forward.
        "head_chunk_tokens": 0,
        "proximal_forward": "always",
    }
    longest = max(len(s.response_ids) for s in samples)
    model = {"dtype": "float32" if mode == "fp32" else "bfloat16"}
    return RunConfig.model_validate({"model": model, "learner": learner, "sampling": {"max_new_tokens": longest}})


class DtypeProbe:
    """Forward hooks that record the output dtype of a few modules, split by training and no-grad forwards."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            phase = "train" if torch.is_grad_enabled() else "no_grad"
            self.seen[f"{name}/{phase}"].add(str(tensor.dtype).removeprefix("torch."))

        return hook

    def summary(self) -> dict[str, list[str]]:
        """Dtypes seen per module and phase."""
        return {k: sorted(v) for k, v in sorted(self.seen.items())}

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A host copy of the parameters (kept off the GPU so that it does not count in its peak memory)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def changed_shares(model: nn.Module, before: dict[str, Tensor]) -> dict[str, float]:
    """Share of parameter elements that differ from `before`: overall, in matrices, in 1-D (norm) weights."""
    counts = {"all": [0, 0], "matrices": [0, 0], "norms": [0, 0]}
    abs_change = 0.0
    for name, p in model.named_parameters():
        old = before[name].to(p.device)
        changed = int((p.detach() != old).sum())
        abs_change += float((p.detach().float() - old.float()).abs().sum())
        for key in ("all", "matrices" if p.dim() > 1 else "norms"):
            counts[key][0] += changed
            counts[key][1] += p.numel()
    shares = {f"share_changed_{k}": round(c / max(n, 1), 6) for k, (c, n) in counts.items()}
    shares["mean_abs_change"] = abs_change / counts["all"][1]
    return shares


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, in GiB (None off CUDA)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (so wall times mean something on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args: argparse.Namespace, shapes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train a fresh model `args.steps` steps in one mode; return dtypes, changed shares, times and memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(shapes, device, args.seed)
    if mode == "pure_bf16":
        model.to(torch.bfloat16)
    samples = build_samples(args.seqs, args.prompt, args.response, shapes["vocab_size"], args.seed)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    trainer = Trainer(make_cfg(mode, samples, device), model, dist)
    layer = model.get_decoder().layers[0]
    probe = DtypeProbe(
        {"decoder_layer0": layer, "layer0_mlp_down_proj": layer.mlp.down_proj, "lm_head": model.get_output_embeddings()}
    )
    before = snapshot(model)
    result: dict[str, Any] = {"autocast_dtype": str(trainer.scorer.autocast_dtype), "steps": []}
    peaks = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        metrics = trainer.train_step(samples)
        sync(device)
        seconds = time.perf_counter() - start
        peaks.append(peak_gib(device))
        keep = ("loss", "grad_norm", "is_weight_mean", "kl_behaviour", "proximal_seconds", "forward_backward_seconds")
        entry = {"wall_seconds": round(seconds, 4), **{k: round(metrics[k], 6) for k in keep}}
        if step == 0:
            result["after_first_step"] = changed_shares(model, before)
        result["steps"].append(entry)
    probe.remove()
    result["after_all_steps"] = changed_shares(model, before)
    result["param_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    result["optimizer_state_dtypes"] = sorted(
        {str(v.dtype).removeprefix("torch.") for s in trainer.optimizer.state.values() for v in s.values() if v.dim()}
    )
    result["output_dtypes"] = probe.summary()
    later = [s["wall_seconds"] for s in result["steps"][1:]] or [result["steps"][0]["wall_seconds"]]
    result["step_seconds_median_after_first"] = round(statistics.median(later), 4)
    result["peak_gpu_memory_gib"] = max(peaks) if device.type == "cuda" else None
    del trainer, model, before
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def checks(results: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The properties the mixed-precision change promises, on the modes that ran."""
    out: dict[str, bool] = {}
    auto = results.get("autocast")
    if auto is not None:
        out["autocast_params_float32"] = auto["param_dtypes"] == ["float32"]
        out["autocast_adamw_state_float32"] = auto["optimizer_state_dtypes"] == ["float32"]
        dtypes = auto["output_dtypes"]
        out["autocast_logits_bf16"] = all(dtypes.get(f"lm_head/{p}") == ["bfloat16"] for p in ("train", "no_grad"))
        out["autocast_linear_bf16"] = dtypes.get("layer0_mlp_down_proj/train") == ["bfloat16"]
        out["autocast_most_elements_change"] = auto["after_first_step"]["share_changed_all"] > 0.5
    bf16 = results.get("pure_bf16")
    if auto is not None and bf16 is not None:
        share_auto = auto["after_first_step"]["share_changed_all"]
        out["pure_bf16_changes_far_fewer"] = bf16["after_first_step"]["share_changed_all"] < 0.2 * share_auto
    return out


def main() -> None:
    """Run the modes, print the JSON summary (and write it with --out); exit 1 if a CUDA check fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="autocast,pure_bf16", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--layers", type=int, default=QWEN3_0_6B["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode")
    parser.add_argument("--seqs", type=int, default=8, help="sequences in the batch")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--response", type=int, default=896, help="response tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a smoke test of the script itself)")
    parser.add_argument("--out", default="", help="also write the JSON summary to this file")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"unknown modes {sorted(unknown)}: choose from {MODES}")
    shapes = (TINY if args.tiny else QWEN3_0_6B) | ({} if args.tiny else {"num_hidden_layers": args.layers})
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device and the memory stats need an index
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(2)

    results = {mode: run_mode(mode, args, shapes, device) for mode in modes}
    verdict = checks(results) if device.type == "cuda" else {}
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": {k: shapes[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings")},
        "batch": {"sequences": args.seqs, "prompt": args.prompt, "response": args.response},
        "lr": LR,
        "correction": "tis",
        **results,
        "checks": verdict,
        "ok": all(verdict.values()),
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
