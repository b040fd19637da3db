"""Checkpoints: exact round trip, Hugging Face loadability, pruning, crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from learner.checkpoint import (
    LATEST_FILE,
    checkpoint_dir_name,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def training_setup(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=4)
    return optimizer, scheduler


def train_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, scheduler: Any, seed: int) -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draw_rng() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_restores_everything_exactly(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    train_step(model, optimizer, scheduler, seed=1)
    seed_everything(123)
    state = {"version": 1, "feeder": {"epoch": 0, "index": 5, "used_ids": ["chain_sum:0:1"]}}
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, state)
    assert folder == tmp_path / "step-000001"
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step-000001"
    expected_draws = draw_rng()

    fresh = tiny_model(seed=99)
    fresh_opt, fresh_sched = training_setup(fresh)
    with pytest.raises(AssertionError):
        assert_same_params(model, fresh)
    loaded = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt, fresh_sched)

    assert loaded == {**state, "step": 1}
    restored_draws = draw_rng()
    assert restored_draws[:2] == expected_draws[:2]
    assert torch.equal(restored_draws[2], expected_draws[2])
    assert_same_params(model, fresh)
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    original, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for index, values in original["state"].items():
        for name, tensor in values.items():
            assert torch.equal(tensor, restored["state"][index][name]), (index, name)
    # The resumed run continues bit for bit like the uninterrupted one
    train_step(model, optimizer, scheduler, seed=2)
    train_step(fresh, fresh_opt, fresh_sched, seed=2)
    assert_same_params(model, fresh)


def test_folder_loads_with_transformers_and_as_plain_weights(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    folder = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"version": 3})
    assert_same_params(model, AutoModelForCausalLM.from_pretrained(folder))
    weights = load_model_weights(folder)
    assert weights["model.embed_tokens.weight"].device.type == "cpu"
    assert torch.equal(weights["model.norm.weight"], model.state_dict()["model.norm.weight"])
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 3, "version": 3}


def test_tokenizer_is_saved_alongside(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "b": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    folder = save_checkpoint(tmp_path, 0, model, optimizer, scheduler, {}, tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == vocab


def test_keep_prunes_older_checkpoints(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-000003", "step-000004"]
    save_checkpoint(tmp_path, 5, model, optimizer, scheduler, {}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-000005"]
    # A resumed run that writes a lower step keeps that one even though a higher one exists
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {}, keep=1)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-000002"]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {"attempt": 1})
    folder = save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {"attempt": 2})
    assert json.loads((folder / "trainer_state.json").read_text())["attempt"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE, "step-000004"]


def test_leftover_tmp_folder_is_ignored_then_cleaned(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    partial = tmp_path / f".tmp-{checkpoint_dir_name(2)}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {})
    assert not partial.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000003"


def test_latest_falls_back_to_newest_complete_folder(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    (tmp_path / LATEST_FILE).write_text("step-000009\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"
    (tmp_path / "step-000002" / "trainer_state.json").unlink()  # a folder without its state is not complete
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-000002", model)


def test_bad_state_fails_before_writing(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"ids": {1, 2}})
    with pytest.raises(ValueError, match="disagrees"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 2})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_load_rejects_weights_of_another_model(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    bigger = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lacks weights"):
        load_checkpoint(folder, bigger)


# A save that blocks inside save_pretrained once the weights are half written, so the test can kill it there
_CRASHING_SAVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from learner.checkpoint import save_checkpoint

    class Model(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)
            self.block = block

        def save_pretrained(self, folder):
            Path(folder, "model.safetensors").write_bytes(b"partial")
            if self.block:
                Path(sys.argv[2]).write_text("ready")
                time.sleep(600)

    root = Path(sys.argv[1])
    for step, block in ((1, False), (2, True)):
        model = Model(block)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        save_checkpoint(root, step, model, optimizer, scheduler, {"version": step})
    """
)


def test_process_killed_mid_save_leaves_previous_checkpoint_latest(tmp_path: Path) -> None:
    root, ready = tmp_path / "ckpt", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_SAVER, str(root), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"saver exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "saver never reached the second save"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert (root / ".tmp-step-000002").is_dir()
    assert (root / LATEST_FILE).read_text().strip() == "step-000001"
    assert latest_checkpoint(root) == root / "step-000001"
    model = tiny_model()
    optimizer, scheduler = training_setup(model)
    save_checkpoint(root, 2, model, optimizer, scheduler, {"version": 2})
    assert sorted(p.name for p in root.iterdir()) == [LATEST_FILE, "step-000001", "step-000002"]
    assert load_checkpoint(latest_checkpoint(root), tiny_model(seed=5)) == {"step": 2, "version": 2}
