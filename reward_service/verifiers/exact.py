"""Exact-match verifier (task kind ``exact``): the final answer must equal the gold answer as text.

For tasks whose answers are words, lists or codes rather than numbers (many reasoning-gym generators: word
sorting, letter jumbles, ciphers), where math-verify's parser does not apply. The final answer is found as the
math verifier finds it (the last ``\\boxed{}``, then its fallbacks); both it and the gold answer are normalised
before comparison: Unicode NFKC, case folded, runs of whitespace made one space, surrounding whitespace and one
trailing full stop removed. The check is linear in the response, so it runs inline.
"""

from __future__ import annotations

import re
import unicodedata
from concurrent.futures import Future

from reward_service.verifiers.base import Question, Status, Verifier, VerifyResult, done
from reward_service.verifiers.math import MathVerifyOptions, extract_answer
from services.config import RewardConfig

MAX_GOLD_CHARS = 10_000
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The form both sides are compared in."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return text.removesuffix(".").rstrip()


class ExactVerifier(Verifier):
    """Compares the extracted final answer with the gold answer after :func:`normalise`."""

    def __init__(self, options: MathVerifyOptions | None = None) -> None:
        self.options = options or MathVerifyOptions()

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> ExactVerifier:
        """Uses the math verifier's answer-extraction fallbacks."""
        return cls(MathVerifyOptions(fallbacks=tuple(cfg.math_fallbacks), timeout_s=cfg.verify_timeout_s))

    @classmethod
    def validate_question(cls, question: Question) -> None:
        """The gold answer is a non-empty string of bounded length."""
        gold = question.ground_truth
        if not isinstance(gold, str) or not normalise(gold):
            raise ValueError("an exact-match question needs a non-empty string ground truth")
        if len(gold) > MAX_GOLD_CHARS:
            raise ValueError(f"an exact-match ground truth has at most {MAX_GOLD_CHARS} characters")

    def check(self, response: str, question: Question, timeout_s: float) -> Future[VerifyResult]:
        """Decide at once (extraction and comparison are linear in the response)."""
        self.validate_question(question)
        extraction = extract_answer(response, self.options)
        if extraction.answer is None:
            return done(VerifyResult(Status.NO_ANSWER, 0.0, None, extraction.problem))
        same = normalise(extraction.answer) == normalise(str(question.ground_truth))
        return done(VerifyResult(Status.CORRECT if same else Status.WRONG, 1.0 if same else 0.0, extraction.answer))
