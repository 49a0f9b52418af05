"""Prompt rendering: the tokenizer's chat template, or ``env.prompt_template`` for a base model."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Union

PLACEHOLDER = "{prompt}"
NO_TEMPLATE_FIX = ('set env.prompt_template (e.g. env.prompt_template="Question: {prompt}\\nAnswer:") to prompt '
                   "a base model, or use a chat/instruct model (or one whose tokenizer_config.json has a "
                   "chat_template)")


def has_chat_template(model_dir: Union[str, Path]) -> bool:
    """Whether the tokenizer saved in ``model_dir`` has a chat template, read from its files (no
    tokenizer load, which costs seconds of imports): ``chat_template.jinja`` (transformers 5),
    ``additional_chat_templates/``, ``chat_template.json``, or tokenizer_config.json's ``chat_template``."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file() or any((d / "additional_chat_templates").glob("*.jinja")):
        return True
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            if json.loads((d / name).read_text()).get("chat_template"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def check_prompt_template(template: str) -> str:
    if not isinstance(template, str) or PLACEHOLDER not in template:
        raise ValueError(f"env.prompt_template must contain {PLACEHOLDER!r} (where the task's prompt goes), "
                         f"got {template!r}")
    return template


def render_prompt_ids(tokenizer: Any, user_text: str, template: Optional[str] = None) -> list[int]:
    """Token ids of the prompt the policy answers: ``template`` with the text in place of ``{prompt}``
    when given (a base model's plain-text prompt; the tokenizer's own special tokens, e.g. BOS,
    added), else a one-message user conversation and the chat template's generation prompt."""
    if template is not None:
        # str.replace, not str.format: a template may hold other braces (LaTeX, JSON examples).
        text = check_prompt_template(template).replace(PLACEHOLDER, user_text)
        return [int(i) for i in tokenizer(text)["input_ids"]]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; {NO_TEMPLATE_FIX}")
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

    def __init__(self, tokenizer: Any, max_entries: int = 8192, template: Optional[str] = None) -> None:
        if template is not None:
            check_prompt_template(template)
        self._render = lru_cache(maxsize=max_entries)(
            lambda text: tuple(render_prompt_ids(tokenizer, text, template)))

    def __call__(self, user_text: str) -> list[int]:
        return list(self._render(user_text))
