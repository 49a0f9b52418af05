"""Guess-the-number: find a secret in ``1..high`` from "higher"/"lower" hints.

The expert plays binary search on the interval still consistent with the hints it has seen, so it
wins within ``ceil(log2(high + 1))`` guesses from any state, including states a weaker player
reached by wasting guesses: the labels DAgger needs on the student's own states.
"""

from __future__ import annotations

import random

from relaxrl.envs.multiturn import StepResult


class GuessEnv:
    """Implements ``MultiTurnEnv``. Reward 1 for naming the secret within ``max_turns`` guesses."""

    def __init__(self, name: str = "guess", high: int = 15, max_turns: int = 5, max_action_tokens: int = 4) -> None:
        if high < 2:
            raise ValueError(f"high must be >= 2, got {high}")
        if max_turns < 1 or max_action_tokens < 1:
            raise ValueError(f"max_turns and max_action_tokens must be >= 1, got {max_turns}, {max_action_tokens}")
        self.name, self.high = name, int(high)
        self.max_turns, self.max_action_tokens = int(max_turns), int(max_action_tokens)
        self.secret = 0
        self.lo, self.hi, self.turns, self.done = 1, self.high, 0, True

    def reset(self, seed: int) -> str:
        self.secret = random.Random(f"{self.name}:{seed}").randint(1, self.high)
        self.lo, self.hi, self.turns, self.done = 1, self.high, 0, False
        return f"guess 1-{self.high}"

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset(seed) first")
        self.turns += 1
        text = action.strip()
        out_of_turns = self.turns >= self.max_turns
        if not text.isdigit() or not 1 <= int(text) <= self.high:
            self.done = out_of_turns
            return StepResult(f"invalid: say a number 1-{self.high}", 0.0, self.done,
                              {"invalid": True, "success": False})
        guess = int(text)
        if guess == self.secret:
            self.done = True
            return StepResult("correct", 1.0, True, {"invalid": False, "success": True})
        if guess < self.secret:  # the hint narrows the interval the expert searches
            self.lo = max(self.lo, guess + 1)
            hint = "higher"
        else:
            self.hi = min(self.hi, guess - 1)
            hint = "lower"
        self.done = out_of_turns
        return StepResult(hint, 0.0, self.done, {"invalid": False, "success": False})

    def expert_action(self) -> str:
        return str((self.lo + self.hi) // 2)
