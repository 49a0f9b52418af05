"""Prompt rendering that works for any HF tokenizer with a chat template."""

from __future__ import annotations

from typing import Any, Mapping


def render_prompt_ids(tokenizer: Any, user_text: str) -> list[int]:
    """Token ids of a one-message user conversation followed by the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; set tokenizer.chat_template "
            "or use a chat/instruct model"
        )
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True
    )
    # transformers 5 returns a BatchEncoding (a Mapping); older versions a plain list of ids.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    ids = out.tolist() if hasattr(out, "tolist") else list(out)
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]
