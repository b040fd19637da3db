"""Math verifier: extract the final answer in the parent, compare it with math-verify in a killable worker pool.

Extraction (last ``\\boxed{}``/``\\fbox{}``, then the configured fallbacks) is cheap, linear and runs in the
caller's thread. The comparison (math-verify's ``parse`` + ``verify``, i.e. sympy) can take unbounded time on
adversarial answers, so it runs in the killable worker processes of ``reward_service.verifiers.pool``: each worker
arms its own interval timer (a soft timeout that keeps the worker alive), and the pool gives up ``kill_grace_s``
later, SIGKILLs the worker and starts a replacement.

Only lists of str/float cross the process boundary, JSON-encoded over pipes (no pickles of our own).
"""

from __future__ import annotations

import asyncio
import queue
import re
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from reward_service.verifiers.base import Question, Status, Verifier, VerifyResult, done
from reward_service.verifiers.math_worker import worker_main
from reward_service.verifiers.pool import PoolJob, WorkerPool
from services.config import RewardConfig

KNOWN_FALLBACKS = ("answer_line", "hashes")
ANSWER_FORMS = ("auto", "number", "any")
_BOX_MARKERS = ("\\boxed", "\\fbox")
# One token per escaped character or brace: linear, no backtracking, and `\{` / `\}` never count as braces.
_BRACE_EVENTS = re.compile(r"\\.|[{}]", re.DOTALL)
_OPENERS = frozenset("{([")
_CLOSERS = frozenset("})]")
# A number literal: an optional sign, then an integer (digits, or thousands groups with `,` or LaTeX `{,}`), a
# decimal, a fraction `a/b` or `\frac{a}{b}`; around it optionally `x=` and `\$` before, `%`/`\%` and a unit in
# `\text{}`/`\mbox{}`/`\mathrm{}` after. Spaces and LaTeX spacing are removed first.
_UNSIGNED = r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_FRACTION = r"\d+/\d+|\\[dt]?frac\{\d+\}\{\d+\}|\\[dt]?frac\d\d"
_NUMBER_LITERAL = re.compile(
    rf"(?:[a-zA-Z]=)?[+-]?(?:\\\$)?(?:{_UNSIGNED}|{_FRACTION})(?:\\?%)?(?:\\(?:text|mbox|mathrm)\{{[a-zA-Z.]*\}})?"
)


@dataclass(frozen=True, slots=True)
class MathVerifyOptions:
    """How answers are extracted and compared; the defaults suit chain-of-thought responses of up to ~50k tokens."""

    fallbacks: tuple[str, ...] = KNOWN_FALLBACKS
    """Tried in order without a closed box: ``answer_line`` (last ``Answer:`` line), ``hashes`` (``#### 42``)."""
    max_response_chars: int = 200_000
    """Longer responses keep only their LAST this-many characters for extraction (the final answer is at the end)."""
    max_answer_chars: int = 1_000
    """An extracted answer longer than this is ``unparsable`` without being sent to a worker."""
    max_gold_chars: int = 1_000
    """A gold answer longer than this is ``unparsable`` (a data problem, reported in ``detail``)."""
    max_bracket_depth: int = 64
    """Answers or golds nested deeper (``{([`` together) are ``unparsable``: the LaTeX parser recurses per level."""
    timeout_s: float = 5.0
    """Default per-item budget of the comparison, counted from when a warm worker receives the item."""
    kill_grace_s: float = 1.0
    """How long after ``timeout_s`` the parent waits for the worker's own soft timeout before killing it."""
    float_rounding: int = 6
    """math-verify ``float_rounding``: decimal places floats are rounded to before comparison."""
    numeric_precision: int = 15
    """math-verify ``numeric_precision``: significant digits of numeric evaluation."""
    answer_form: str = "auto"
    """``auto``: a boxed answer to a question whose gold is a number literal must be a number literal too (an
    expression that evaluates to it, such as the question copied into the box, is ``wrong``); ``number``: every boxed
    answer must be one; ``any``: no rule. Fallback answers (prose lines) are not checked."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.fallbacks if name not in KNOWN_FALLBACKS]
        if unknown:
            raise ValueError(f"unknown math fallbacks {unknown}: use a subset of {KNOWN_FALLBACKS}")
        for name in ("max_response_chars", "max_answer_chars", "max_gold_chars", "max_bracket_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.answer_form not in ANSWER_FORMS:
            raise ValueError(f"unknown math answer_form {self.answer_form!r}: use one of {ANSWER_FORMS}")
        if self.timeout_s <= 0 or self.kill_grace_s <= 0:
            raise ValueError("timeout_s and kill_grace_s must be > 0 seconds")


@dataclass(frozen=True, slots=True)
class Extraction:
    """The final answer found in a response: ``answer`` is None when there is none, ``problem`` says why."""

    answer: str | None
    source: str = ""
    problem: str = ""


# ---- Extraction (parent side, pure functions)


def extract_answer(response: str, options: MathVerifyOptions | None = None) -> Extraction:
    """Find the final answer: the last closed ``\\boxed{...}``/``\\fbox{...}``, else the enabled fallbacks."""
    opts = options or MathVerifyOptions()
    text = response[-opts.max_response_chars :] if len(response) > opts.max_response_chars else response
    answer, problem = _last_box(text)
    source = "boxed"
    if answer is None:
        for name in opts.fallbacks:
            answer = _FALLBACK_EXTRACTORS[name](text)
            if answer is not None:
                source = name
                break
    if answer is None:
        return Extraction(None, "", problem or "no \\boxed{} answer and no fallback matched")
    answer = _strip_delimiters(answer)
    if not answer:
        return Extraction(None, source, f"empty {source} answer")
    return Extraction(answer, source)


def _last_box(text: str) -> tuple[str | None, str]:
    """Body of the last box marker that opens a box; an unclosed last box yields no answer (a truncated response)."""
    # One cached position per marker, so each marker's rfind scans every character once in total.
    positions = {marker: text.rfind(marker) for marker in _BOX_MARKERS}
    while True:
        marker = max(positions, key=lambda m: positions[m])
        start = positions[marker]
        if start < 0:
            return None, ""
        body, is_box = _box_body(text, start + len(marker))
        if is_box:
            if body is None:
                return None, f"the last {marker}{{ is never closed"
            return body, ""
        positions[marker] = text.rfind(marker, 0, start)


def _box_body(text: str, after: int) -> tuple[str | None, bool]:
    """Parse what follows a box marker: ``{...}`` (balanced) or ``\\boxed 5``; ``is_box`` False for ``\\boxedx``."""
    i = after
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = _matching_brace(text, i)
        return (text[i + 1 : close] if close >= 0 else None), True
    if i == after or i >= len(text):
        return None, False
    end = i
    while end < len(text) and not text[end].isspace() and text[end] != "$":
        end += 1
    return text[i:end], True


def _matching_brace(text: str, open_at: int) -> int:
    """Index of the brace that closes ``text[open_at]``, or -1 when it is never closed."""
    depth = 0
    for match in _BRACE_EVENTS.finditer(text, open_at):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return match.start()
    return -1


def _answer_line(text: str) -> str | None:
    """Rest of the line after the last ``Answer:`` (any of three casings; ``**Answer:**`` included)."""
    # rfind per casing rather than text.lower(): lowering can change string length and thus indices.
    hits = [(text.rfind(key), key) for key in ("Answer:", "answer:", "ANSWER:")]
    start, key = max(hits)
    if start < 0:
        return None
    return _rest_of_line(text, start + len(key))


def _hashes(text: str) -> str | None:
    """Rest of the line after the last GSM8K ``####`` marker."""
    start = text.rfind("####")
    if start < 0:
        return None
    return _rest_of_line(text, start + 4).lstrip("#")


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)]


_FALLBACK_EXTRACTORS: dict[str, Callable[[str], str | None]] = {"answer_line": _answer_line, "hashes": _hashes}


def _strip_delimiters(answer: str) -> str:
    """Drop markdown emphasis, math delimiters and a sentence's final period around an answer."""
    text = answer.strip().lstrip("*$ \t").rstrip("*$. \t")
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip().rstrip(".").strip()
    return text


def shape_problem(text: str, what: str, max_chars: int, max_depth: int) -> str | None:
    """Why ``text`` is too large to hand to the parser (length or bracket depth), or None when it is fine."""
    if len(text) > max_chars:
        return f"{what} has {len(text)} characters, more than the cap of {max_chars}"
    depth = deepest = 0
    for char in text:
        if char in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSERS:
            depth -= 1
    if deepest > max_depth:
        return f"{what} nests brackets {deepest} deep, more than the cap of {max_depth}"
    return None


def is_number_literal(text: str) -> bool:
    """True for a plain number as a final answer (``42``, ``-3.5``, ``1,234``, ``3/4``, ``\\frac{3}{4}``, ``25\\%``)."""
    return _NUMBER_LITERAL.fullmatch(re.sub(r"\s+|\\[,;!]", "", text)) is not None


def answer_form_problem(answer: str, gold: str, form: str) -> str | None:
    """Why ``answer`` has the wrong form for ``gold`` under rule ``form`` (see MathVerifyOptions), or None."""
    if form == "any" or is_number_literal(answer):
        return None
    if form == "number":
        return "answer is not a number literal (answer_form=number)"
    if is_number_literal(gold):
        return "answer is not a number literal, and the gold answer is one (answer_form=auto)"
    return None


def _gold_answer(gold: str) -> str:
    """A gold written as ``\\boxed{x}`` or ``$x$`` is reduced to ``x``; a bare answer is kept as is."""
    body, _ = _last_box(gold)
    return _strip_delimiters(body if body is not None else gold)


# ---- Parent side: the pool


def _result(status: Status, extracted: str | None, detail: str = "") -> VerifyResult:
    return VerifyResult(
        status=status, score=1.0 if status is Status.CORRECT else 0.0, extracted=extracted, detail=detail
    )


class MathVerifier(Verifier):
    """A pool of math-verify worker processes with a hard per-item timeout; thread-safe, close() when done."""

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> MathVerifier:
        """The pool of one reward replica: its fallbacks, time bound and number of workers."""
        options = MathVerifyOptions(
            fallbacks=tuple(cfg.math_fallbacks), timeout_s=cfg.verify_timeout_s, answer_form=cfg.math_answer_form
        )
        return cls(options, num_workers=cfg.verifier_workers)

    @classmethod
    def validate_question(cls, question: Question) -> None:
        """A math question needs its gold answer as a string."""
        if not isinstance(question.ground_truth, str):
            raise ValueError(f"math task needs a string ground truth, got {type(question.ground_truth).__name__}")

    def __init__(
        self,
        options: MathVerifyOptions | None = None,
        num_workers: int = 2,
        max_pending: int = 1024,
        start_method: Literal["forkserver", "spawn"] = "forkserver",
        start_timeout_s: float = 60.0,
        memory_limit_mb: int = 2048,
    ) -> None:
        self.options = options or MathVerifyOptions()
        args = (self.options.float_rounding, self.options.numeric_precision, memory_limit_mb)
        self._pool = WorkerPool("math", worker_main, args, num_workers=num_workers, max_pending=max_pending,
                                start_method=start_method, start_timeout_s=start_timeout_s,
                                kill_grace_s=self.options.kill_grace_s, preload=["math_verify"])  # fmt: skip

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._pool.closed

    @property
    def worker_restarts(self) -> int:
        """Workers started beyond the initial ones (kills, crashes, failed starts): a metric for the service."""
        return self._pool.worker_restarts

    def worker_pids(self) -> list[int]:
        """Process ids of the workers that are currently ready."""
        return self._pool.worker_pids()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until every worker has warmed up (or the timeout passes); True when all are ready."""
        return self._pool.wait_ready(timeout_s)

    def submit(
        self, response: str, gold: str, timeout_s: float | None = None, *, block: bool = True
    ) -> Future[VerifyResult]:
        """Extract the answer now and queue its comparison; queue.Full when the queue is full and block is False."""
        if self._pool.closed:
            raise RuntimeError("MathVerifier is closed")
        opts = self.options
        extraction = extract_answer(response, opts)
        if extraction.answer is None:
            return done(_result(Status.NO_ANSWER, None, extraction.problem))
        answer = extraction.answer
        problem = shape_problem(answer, "answer", opts.max_answer_chars, opts.max_bracket_depth)
        gold_text = _gold_answer(gold)
        problem = problem or shape_problem(gold_text, "gold answer", opts.max_gold_chars, opts.max_bracket_depth)
        if problem is not None:
            return done(_result(Status.UNPARSABLE, None if len(answer) > opts.max_answer_chars else answer, problem))
        budget_s = opts.timeout_s if timeout_s is None else timeout_s
        # Fallback lines are prose ("Answer: the total is 12"), read by math-verify's own extraction; the rule is
        # about what a model puts in its box.
        form = answer_form_problem(answer, gold_text, opts.answer_form) if extraction.source == "boxed" else None

        def decode(reply: list[Any]) -> VerifyResult:
            status, detail = Status(str(reply[0])), str(reply[1])
            if status is Status.CORRECT and form is not None:  # equal, but not in the answer form the task asks
                return _result(Status.WRONG, answer, form)
            return _result(status, answer, detail)

        job = PoolJob((answer, extraction.source, gold_text, budget_s), budget_s, Future(), decode,
                      lambda status, detail: _result(status, answer, detail))  # fmt: skip
        return self._pool.submit(job, block=block)

    def check(self, response: str, question: Question, timeout_s: float) -> Future[VerifyResult]:
        """The Verifier entry point: ``submit`` against the question's gold answer."""
        self.validate_question(question)
        return self.submit(response, question.ground_truth, timeout_s)

    def verify(self, response: str, gold: str, timeout_s: float | None = None) -> VerifyResult:
        """Verify one response against its gold answer, blocking the calling thread."""
        return self.submit(response, gold, timeout_s).result()

    async def averify(self, response: str, gold: str, timeout_s: float | None = None) -> VerifyResult:
        """Verify without blocking the event loop (the short extraction runs inline)."""
        try:
            future = self.submit(response, gold, timeout_s, block=False)
        except queue.Full:
            future = await asyncio.to_thread(self.submit, response, gold, timeout_s)
        return await asyncio.wrap_future(future)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (asking first, then SIGKILL) and fail every job still queued with ``error``."""
        self._pool.close(timeout_s)

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
