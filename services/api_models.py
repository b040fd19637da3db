"""Typed, versioned HTTP bodies of the services' APIs (the stream messages live in ``services.protocol``).

JSON bodies are validated by pydantic with unknown fields rejected; sizes are bounded so a request cannot make a
service allocate without limit. ``POST /v1/score`` also accepts the ``rollouts`` stream message itself as
``application/msgpack``.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.extensions import TaskKind
from services.protocol import Sampling

API_VERSION = 1
MAX_RESPONSES = 1024
MAX_TOKENS = 262_144
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_GROUND_TRUTH_CHARS = 65_536
"""A ground truth as JSON: a math answer or a BFCL call list is far smaller; the function-call checker's cost grows
with it (its options times the calls), so the caller cannot make it unbounded."""
MAX_TOOLS_CHARS = 262_144


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatTurn(_Body):
    """One chat message."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=1_000_000)


class SamplingBody(_Body):
    """Sampling parameters in a JSON body: the HTTP edge of the one sampling record, ``services.protocol.Sampling``.

    The defaults are the record's; temperature 0 means greedy (ad-hoc generation; a training task needs > 0).
    """

    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=1_000_000)
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (off) or >= 1")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
        return self

    def record(self) -> Sampling:
        """The sampling record this body describes."""
        return Sampling(**self.model_dump())


class TaskBody(_Body):
    """The prompt a group answers, with what the verifier needs."""

    prompt_id: str = Field("adhoc", min_length=1, max_length=256)
    task_kind: TaskKind
    messages: list[ChatTurn] = Field(min_length=1, max_length=256)
    ground_truth: str | list[Any] | dict[str, Any]
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=256)
    category: str = Field("", max_length=128)
    sampling: SamplingBody = Field(default_factory=SamplingBody)

    @model_validator(mode="after")
    def _bounded(self) -> Self:
        problem = task_size_problem(self.ground_truth, self.tools)
        if problem is not None:
            raise ValueError(problem)
        return self


def task_size_problem(ground_truth: Any, tools: list[dict[str, Any]]) -> str | None:
    """Why a task's ground truth or tools are too large to verify against (as JSON), or None."""
    for what, value, cap in (("ground_truth", ground_truth, MAX_GROUND_TRUTH_CHARS), ("tools", tools, MAX_TOOLS_CHARS)):
        size = len(json.dumps(value, ensure_ascii=False, default=str))
        if size > cap:
            return f"{what} is {size} characters as JSON, more than the cap of {cap}"
    return None


class ResponseBody(_Body):
    """One sampled response: its text, and the token ids and behaviour log-probs when perplexity matters."""

    text: str = Field(max_length=4_000_000)
    token_ids: list[int] = Field(default_factory=list, max_length=MAX_TOKENS)
    logprobs: list[float] = Field(default_factory=list, max_length=MAX_TOKENS)
    finish_reason: Literal["stop", "length", "abort"] = "stop"
    version: int = Field(0, ge=0, lt=2**32, description="Policy version that sampled it (the wire holds uint32).")


class ScoreRequest(_Body):
    """``POST /v1/score``: one group to score synchronously."""

    v: Literal[1] = 1
    task: TaskBody
    responses: list[ResponseBody] = Field(min_length=1, max_length=MAX_RESPONSES)


class ScoreResponse(_Body):
    """What ``POST /v1/score`` returns: the scored group's per-response and per-group fields."""

    v: Literal[1] = 1
    prompt_id: str
    status: list[str]
    correct: list[bool]
    reward: list[float]
    realloc_reward: list[float]
    perplexity: list[float | None]
    group_kind: str
    action: str
    tau: float | None
    gate_open: bool
    signal: bool


class HealthResponse(_Body):
    """``GET /health``: whether the service did real work just now, and how long it took."""

    ok: bool
    component: str
    detail: str = ""
    seconds: float = 0.0
