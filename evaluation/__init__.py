"""Evaluation of a policy on held-out items: K samples per item, verified, reported as mean@K, pass@K and maj@K.

A tool beside the services: it uses the rollout backends, the verifiers and the learner's data module; none of the
services imports it. Run it with ``python -m evaluation`` (``dipo eval``); see docs/EVALUATION.md.
"""

from evaluation.core import (
    EvalResult,
    ItemResult,
    Metrics,
    SampleVerdict,
    compute_metrics,
    evaluate,
    held_out_data,
    majority_vote,
    overlap_report,
    parse_data_spec,
)

__all__ = [
    "EvalResult",
    "ItemResult",
    "Metrics",
    "SampleVerdict",
    "compute_metrics",
    "evaluate",
    "held_out_data",
    "majority_vote",
    "overlap_report",
    "parse_data_spec",
]
