"""Builders of realistic stream messages for tests (importable as ``factories`` from any test folder)."""

from __future__ import annotations

import time

import numpy as np

from services.protocol import PromptTask, Response, RolloutGroup, Sampling


def math_task(prompt_id: str, gold: str = "7", n: int = 4, max_new_tokens: int = 64) -> PromptTask:
    """A math prompt task with gold answer ``gold``."""
    return PromptTask(
        prompt_id=prompt_id,
        task_kind="math",
        messages=[{"role": "user", "content": f"Compute {gold} + 0. Put the answer in \\boxed{{}}."}],
        ground_truth=gold,
        n=n,
        sampling=Sampling(max_new_tokens=max_new_tokens),
    )


def response(
    text: str, nll: float = 0.5, length: int = 8, version: int = 0, seed: int = 0, weights: str | None = None
) -> Response:
    """A response whose mean token NLL is ``nll`` (so its perplexity is exp(nll)), sampled with the weights of
    fingerprint ``weights`` (default: a made-up ``v{version}:test``)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 0.05, size=length)
    logprobs = (-nll + noise - noise.mean()).astype(np.float32)
    ids = rng.integers(0, 49_000, size=length).astype(np.uint32)
    return Response.of_version(ids, logprobs, text, "stop", version, weights or f"v{version}:test")


def math_group(
    prompt_id: str, answers: list[str], gold: str = "7", nlls: list[float] | None = None, version: int = 0
) -> RolloutGroup:
    """A rollout group whose i-th response boxes ``answers[i]`` with mean NLL ``nlls[i]``."""
    nlls = nlls or [0.5] * len(answers)
    responses = [
        response(f"The answer is \\boxed{{{a}}}", nll, version=version, seed=i)
        for i, (a, nll) in enumerate(zip(answers, nlls, strict=True))
    ]
    task = math_task(prompt_id, gold, n=len(answers))
    return RolloutGroup(task, np.arange(5, dtype=np.uint32), responses, "test", time.time(), 0.1)
