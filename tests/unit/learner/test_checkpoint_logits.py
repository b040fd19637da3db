"""A learner checkpoint is a plain Hugging Face folder: transformers loads it and gets the learner's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from learner.advantages import group_advantages
from learner.batch import Sample
from learner.checkpoint import save_checkpoint
from learner.distributed import DistInfo
from learner.train import Trainer
from services.config import RunConfig
from services.modeling.loading import load_model, load_tokenizer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_checkpoint_of_a_trained_default_model_gives_the_learners_logits(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    cfg = RunConfig.model_validate({"learner": {"lr": 1e-4, "correction": "none"}})
    trainer = Trainer(cfg, model, CPU)
    rng = np.random.default_rng(0)
    prompt = np.array(tokenizer("What is 2 + 3?")["input_ids"], dtype=np.uint32)
    advantages = group_advantages(np.array([1.0, 0.0, 1.0, 0.0]), np.zeros(4), alpha=0.1)
    samples = [
        Sample(f"g-{i}", prompt, rng.integers(0, 49_000, 6).astype(np.uint32), np.full(6, -2.0, np.float32),
               float(a), 1.0, 0, True)
        for i, a in enumerate(advantages)
    ]  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step(samples)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step changed weights

    folder = save_checkpoint(tmp_path, 1, model, trainer.optimizer, trainer.scheduler, {"version": 1},
                             tokenizer=tokenizer)  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor([tokenizer("The answer is \\boxed{5}.")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, expected)
