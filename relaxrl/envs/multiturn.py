"""Multi-turn environment contract (no Ray here).

An episode is a chat: the env's first observation is the first user message, each action an
assistant message, each later observation a user message. Its tokens are assembled turn by turn,
never re-rendered (``relaxrl.envs.chat_tokens``): the policy's sampled tokens carry loss mask 1,
everything the env or the template wrote carries 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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
