"""HTTP bodies of the rollout server: ``POST /v1/generate``, ``POST /v1/weights/reload`` and ``GET /health``.

Unknown fields are rejected and every size is bounded, so one request cannot make the server allocate without limit.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.api_models import API_VERSION, ChatTurn, SamplingBody

MAX_N = 64
MAX_NEW_TOKENS = 4096
MAX_TOTAL_TOKENS = 65_536  # n x max_new_tokens of one request
MAX_PROMPT_CHARS = 1_000_000

WorkerState = Literal["running", "disabled", "stopped", "failed"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(_Body):
    """``POST /v1/generate``: sample n completions of one prompt, given as chat messages or as rendered text."""

    # The schema states the either-or of `_check` too, so clients and schema fuzzers can build valid requests.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
            ]
        },
    )
    v: Literal[1] = API_VERSION
    messages: list[ChatTurn] | None = Field(None, min_length=1, max_length=256)
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=MAX_N)
    sampling: SamplingBody = Field(default_factory=SamplingBody)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (chat turns) or `prompt` (already rendered text)")
        if self.sampling.max_new_tokens > MAX_NEW_TOKENS:
            raise ValueError(f"sampling.max_new_tokens must be at most {MAX_NEW_TOKENS} for ad-hoc generation")
        if self.n * self.sampling.max_new_tokens > MAX_TOTAL_TOKENS:
            raise ValueError(f"n x max_new_tokens must be at most {MAX_TOTAL_TOKENS}")
        return self


class SpanBody(_Body):
    """Tokens from ``start`` on (up to the next span) were sampled by policy ``version`` with weights ``weights``."""

    start: int
    version: int
    weights: str = Field(description="Fingerprint of those weights ('' when not known).")


class CompletionBody(_Body):
    """One completion: its text, tokens, the log-prob of each token under the sampling distribution, its end, and
    which weights sampled which tokens (weights may change while a completion is generated)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length", "abort"]
    spans: list[SpanBody]


class GenerateResponse(_Body):
    """What ``POST /v1/generate`` returns."""

    v: Literal[1] = API_VERSION
    version: int = Field(description="The oldest policy version that sampled any token of the completions.")
    prompt_token_ids: list[int]
    completions: list[CompletionBody]
    seconds: float


class ReloadRequest(_Body):
    """``POST /v1/weights/reload``: load a Hugging Face folder's safetensors weights (admin)."""

    v: Literal[1] = API_VERSION
    checkpoint: str = Field(
        min_length=1, max_length=4096,
        description="A checkpoint folder inside the run's checkpoint folder: its absolute path, or its name there.",
    )  # fmt: skip
    version: int | None = Field(
        None, ge=0, description="Policy version to stamp on what the weights generate; default: keep the current one."
    )


class ReloadResponse(_Body):
    """What ``POST /v1/weights/reload`` returns once the new weights are in place."""

    v: Literal[1] = API_VERSION
    version: int
    tensors: int
    seconds: float


class RolloutHealth(_Body):
    """``GET /health``, answered from the engine's state (never queued behind generation)."""

    ok: bool
    component: Literal["rollout"] = "rollout"
    detail: str = ""
    seconds: float = 0.0
    version: int = 0
    weights: str = Field("", description="Fingerprint of the weights in place.")
    canary_version: int | None = Field(None, description="Version of the last canary scored (after a swap).")
    worker: WorkerState = "disabled"
    groups: int = Field(0, description="Groups in flight in the engine.")
    rows: int = Field(0, description="Decode slots in use.")
    max_rows: int = Field(0, description="Decode slots.")
    steps: int = Field(0, description="Decode steps run since the start.")


class DrainRequest(_Body):
    """``POST /v1/drain``: stop taking prompts (an empty object: ``{}``)."""

    v: Literal[1] = API_VERSION


class DrainResponse(_Body):
    """``POST /v1/drain`` (start draining: take no more prompts) and ``GET /v1/drain`` (progress): a preStop hook
    polls until no group is in flight."""

    v: Literal[1] = API_VERSION
    draining: bool
    in_flight_groups: int = Field(description="Groups taken from the stream and not yet written.")
