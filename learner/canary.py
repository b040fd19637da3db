"""The learner's scoring of the canary sequence (services/canary.py): the reference rollout servers are held to."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from learner.batch import Sample
from learner.packing import Row, Segment, collate
from learner.train import Trainer


def score_tokens(trainer: Trainer, ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced log-probs (T = 1) of ``ids[1:]`` under the trainer's current weights, in eval mode.

    The canary is laid out as one sample (the first token its prompt, the rest its response) and runs through
    the trainer's scorer, the module FSDP shards, so under FSDP every rank must call it together.
    """
    if len(ids) < 2:
        raise ValueError("a canary needs at least two tokens")
    tokens = np.asarray(ids, np.uint32)
    sample = Sample("canary", tokens[:1], tokens[1:], np.zeros(len(tokens) - 1, np.float32), 0.0, 1.0, 0)
    batch = collate([Row((Segment(sample.prompt_ids, (sample,)),))], trainer.dist.device)
    scorer = trainer.scorer
    was_training = scorer.training
    scorer.eval()
    try:
        with torch.no_grad():
            logp, _ = scorer(batch.inputs, 1.0)
    finally:
        scorer.train(was_training)
    return logp[0].float().cpu().numpy().astype(np.float32)
