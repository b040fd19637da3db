"""Model resolution, one-time GGUF conversion, and loading of local Hugging Face folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, even by accident

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.modeling import loading
from services.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def default_model_dir() -> Path:
    """The converted default model in the shared cache (converted on first use, ~30 s once)."""
    return resolve_model_path(DEFAULT_MODEL)


def _fake_converter(calls: list[int], delay: float = 0.0):
    def convert(spec: loading.BuiltinModel, out_dir: Path) -> None:
        calls.append(1)
        time.sleep(delay)
        for fname in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out_dir / fname).write_text("{}")

    return convert


def test_conversion_writes_a_plain_hf_folder(default_model_dir: Path) -> None:
    for fname in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (default_model_dir / fname).is_file(), fname
    assert "quantization_config" not in (default_model_dir / "config.json").read_text()
    assert load_tokenizer(default_model_dir).chat_template is not None
    assert not list(default_model_dir.parent.glob(f".{DEFAULT_MODEL}.tmp-*"))


def test_second_resolution_reuses_the_cache(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(spec: loading.BuiltinModel, out_dir: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "convert_gguf", fail)
    assert resolve_model_path(DEFAULT_MODEL) == default_model_dir
    assert weights.stat().st_mtime_ns == before


def test_concurrent_resolutions_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(loading, "convert_gguf", _fake_converter(calls, delay=0.3))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1]
    assert results == [tmp_path / DEFAULT_MODEL] * 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [DEFAULT_MODEL]


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(spec: loading.BuiltinModel, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(loading, "convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_cache_location_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(loading, "convert_gguf", _fake_converter(calls))
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    assert resolve_model_path(DEFAULT_MODEL) == tmp_path / DEFAULT_MODEL
    assert calls == [1]


def test_unknown_names_and_bare_folders_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither an existing local folder"):
        resolve_model_path("no-such-model")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_local_folder_is_loaded_as_is(tmp_path: Path, default_model_dir: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    saved = LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path)
    load_tokenizer(default_model_dir).save_pretrained(tmp_path)

    assert resolve_model_path(str(tmp_path)) == tmp_path
    model = load_model(tmp_path)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert load_model(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_missing_pad_token_becomes_eos(tmp_path: Path, default_model_dir: Path) -> None:
    tokenizer = load_tokenizer(default_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((default_model_dir / "config.json").read_text())
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"


def test_default_model_answers_simple_arithmetic(default_model_dir: Path) -> None:
    model = load_model(default_model_dir)
    tokenizer = load_tokenizer(default_model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer
