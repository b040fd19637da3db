"""The canary sequence as token ids (both sides render it with their own tokenizer; services/canary.py)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from services.canary import CANARY_TEXT, CANARY_TOKENS


def canary_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The canary: one user turn of the chat template (or the bare text without a template), cut to its length."""
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": CANARY_TEXT}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = list(rendered["input_ids"])
    else:
        ids = list(tokenizer(CANARY_TEXT, add_special_tokens=False)["input_ids"])
    return ids[:CANARY_TOKENS]
