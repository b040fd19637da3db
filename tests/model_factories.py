"""Tiny random models for tests (importable as ``model_factories``): no download, the real default tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.modeling.loading import DEFAULT_MODEL, load_tokenizer


def save_tiny_llama(
    folder: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """A random tied-embedding Llama with the default model's tokenizer and chat template, saved as an HF folder."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
