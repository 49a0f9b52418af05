"""Environment contracts. Envs and verifiers never import Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol


@dataclass(frozen=True)
class Task:
    """One prompt with what its verifier needs to score a response."""

    task_id: str
    prompt: str  # the user message; rendered with the tokenizer's chat template by the driver
    answer: str  # ground truth handed to the verifier only
    domain: str = "default"
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class SingleTurnEnv(Protocol):
    name: str

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        """An endless (train) or finite (eval) deterministic stream of tasks for ``split``."""

    def verify(self, response: str, task: Task) -> float:
        """Reward of ``response`` for ``task``; may raise or hang: the reward role guards it."""
