"""The exact-match verifier (task kind ``exact``): the docs/EXTENDING.md worked example of a verifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from reward_service.verifiers import verifier_class
from reward_service.verifiers.base import Status
from reward_service.verifiers.exact import ExactVerifier, normalise
from reward_service.verify import Verifiers
from services.config import RewardConfig


@dataclass
class Question:
    ground_truth: Any
    task_kind: str = "exact"
    tools: list[dict[str, Any]] = field(default_factory=list)
    category: str = "word_sorting"


def status(response: str, gold: str) -> Status:
    return ExactVerifier().check(response, Question(gold), timeout_s=1.0).result(timeout=1).status


def test_it_is_the_registered_exact_verifier() -> None:
    assert verifier_class("exact") is ExactVerifier


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("so the answer is \\boxed{apple, banana}", "apple, banana", Status.CORRECT),
        ("\\boxed{Apple,  Banana.}", "apple, banana", Status.CORRECT),  # case, spacing and a full stop
        ("\\boxed{ＡＢＣ}", "abc", Status.CORRECT),  # NFKC: full-width letters
        ("\\boxed{banana, apple}", "apple, banana", Status.WRONG),  # order matters: this is not math
        ("\\boxed{1/2}", "0.5", Status.WRONG),  # no numeric equivalence either
        ("Answer: cat", "cat", Status.CORRECT),  # the math verifier's fallbacks
        ("I do not know.", "cat", Status.NO_ANSWER),
    ],
)
def test_final_answers_compare_as_normalised_text(response: str, gold: str, expected: Status) -> None:
    assert status(response, gold) is expected


def test_normalise() -> None:
    assert normalise("  Hello\tWorld.\n") == "hello world"
    assert normalise("x..") == "x."  # one trailing full stop only


@pytest.mark.parametrize("gold", [None, 42, ["a"], "   ", "x" * 10_001])
def test_questions_it_cannot_check_are_value_errors(gold: Any) -> None:
    with pytest.raises(ValueError, match="exact-match"):
        ExactVerifier.validate_question(Question(gold))


async def test_the_reward_service_path_verifies_it() -> None:
    verifiers = Verifiers(RewardConfig(), kinds=("exact",))
    try:
        result = await verifiers.verify(Question("blue"), "The colour is \\boxed{Blue}")
    finally:
        verifiers.close()
    assert result.status is Status.CORRECT and result.score == 1.0 and result.extracted == "Blue"
