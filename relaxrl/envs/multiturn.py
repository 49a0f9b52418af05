"""Multi-turn environment contract and the chat rendering of an episode (no Ray here).

An episode is a chat: the env's first observation is the first user message, each action an
assistant message, each later observation a user message. Rendering uses the tokenizer's own chat
template, so the same code serves the tiny character model and any HF chat model. In the rendered
token ids, the policy's tokens (assistant content and its end-of-turn token) carry loss mask 1;
everything the env or the template wrote carries 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence


@dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class MultiTurnEnv(Protocol):
    """One episode at a time; build one env object per concurrent episode."""

    name: str
    max_turns: int  # the episode ends (reward 0 unless already won) after this many actions
    max_action_tokens: int  # generation budget of one action

    def reset(self, seed: int) -> str:
        """Start the episode of ``seed`` (deterministic); returns the first observation."""

    def step(self, action: str) -> StepResult:
        """Apply ``action``; an invalid one gets an explanatory observation, never an exception."""

    def expert_action(self) -> str:
        """The programmatic expert's action in the current state (the DAgger label)."""


def _ids(out: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding (a Mapping); older versions a plain list of ids.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    ids = out.tolist() if hasattr(out, "tolist") else list(out)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def render_ids(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; multi-turn envs need one")
    return _ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=True))


def messages_of(first_observation: str, actions: Sequence[str], observations: Sequence[str]) -> list[dict]:
    """The chat of an episode: observation, action, observation, action, ..."""
    msgs = [{"role": "user", "content": first_observation}]
    for k, action in enumerate(actions):
        msgs.append({"role": "assistant", "content": action})
        if k < len(observations):
            msgs.append({"role": "user", "content": observations[k]})
    return msgs


def render_episode(tokenizer: Any, messages: Sequence[dict]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Token ids of a whole episode, their loss mask, and the ``[start, end)`` span of each action.

    Spans come from rendering growing prefixes of the chat; a template whose rendering of a prefix
    is not a prefix of the whole (it rewrites history) is refused with a clear error.
    """
    ids: list[int] = []
    mask: list[int] = []
    spans: list[tuple[int, int]] = []
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant":
            before = render_ids(tokenizer, messages[:k], generation_prompt=True)
        else:
            before = render_ids(tokenizer, messages[:k], generation_prompt=False) if k else []
        after = render_ids(tokenizer, messages[: k + 1], generation_prompt=False)
        for prefix, what in ((ids, "episode so far"), (before, "turn prefix")):
            if after[: len(prefix)] != prefix:
                raise ValueError(
                    f"chat template re-renders the {what} differently at message {k}; multi-turn "
                    "episodes need a template whose renderings of prefixes are token prefixes"
                )
        if msg["role"] == "assistant":
            mask += [0] * (len(before) - len(ids)) + [1] * (len(after) - len(before))
            spans.append((len(before), len(after)))
        else:
            mask += [0] * (len(after) - len(ids))
        ids = after
    return ids, mask, spans
