"""Prompt rendering that works for any HF tokenizer with a chat template."""

from __future__ import annotations

from functools import lru_cache
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


class PromptEncoder:
    """``render_prompt_ids`` with a bounded cache of recent prompts.

    The driver renders every group's prompt on its one thread, and the chat template costs ~0.5 ms a
    prompt on a small CPU; a prompt set revisited every epoch (or a small task space) is rendered once
    per ``max_entries`` distinct prompts. Each call returns a fresh list."""

    def __init__(self, tokenizer: Any, max_entries: int = 8192) -> None:
        self._render = lru_cache(maxsize=max_entries)(lambda text: tuple(render_prompt_ids(tokenizer, text)))

    def __call__(self, user_text: str) -> list[int]:
        return list(self._render(user_text))
