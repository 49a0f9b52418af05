"""Tool use: answer ``a+b`` only after calling the calculator tool with the right arguments.

Actions are ``calc(EXPR)`` (the tool answers ``=VALUE``) or ``answer(N)`` (ends the episode). The
reward is 1 only if the answer is right *and* an earlier call computed exactly the question's
expression: guessing without the tool, or reading the result of a wrong call, fails. The expert
calls the tool with the question's expression until it has, then answers with the tool's result.
A student that mis-copies the arguments reaches a state (a wrong tool result in the history) that
expert demonstrations never contain; there the expert's label is to call again, correctly.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from relaxrl.envs.multiturn import StepResult

VALID_OPS = ("+", "-", "*")
_CALL = re.compile(r"^calc\((\d{1,4})([+\-*])(\d{1,4})\)$")
_ANSWER = re.compile(r"^answer\((-?\d{1,6})\)$")
USAGE = "invalid: use calc(A+B) or answer(N)"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class CalculatorEnv:
    """Implements ``MultiTurnEnv``."""

    def __init__(
        self,
        name: str = "calculator",
        ops: Sequence[str] = ("+",),
        min_operand: int = 10,
        max_operand: int = 99,
        max_turns: int = 4,
        max_action_tokens: int = 14,
    ) -> None:
        ops = tuple(ops)
        bad = [op for op in ops if op not in VALID_OPS]
        if not ops or bad:
            raise ValueError(f"ops must be a non-empty subset of {list(VALID_OPS)}, got {list(ops)}")
        if not 0 <= min_operand <= max_operand <= 9999:
            raise ValueError(f"need 0 <= min_operand <= max_operand <= 9999, got {min_operand}, {max_operand}")
        if max_turns < 2 or max_action_tokens < 1:
            raise ValueError(f"need max_turns >= 2 (call, then answer) and max_action_tokens >= 1")
        self.name, self.ops = name, ops
        self.min_operand, self.max_operand = int(min_operand), int(max_operand)
        self.max_turns, self.max_action_tokens = int(max_turns), int(max_action_tokens)
        self.question = ("", 0, "+", 0)
        self.called_right, self.last_result, self.turns, self.done = False, None, 0, True

    def reset(self, seed: int) -> str:
        rng = random.Random(f"{self.name}:{seed}")
        a, b = rng.randint(self.min_operand, self.max_operand), rng.randint(self.min_operand, self.max_operand)
        op = rng.choice(self.ops)
        self.question = (f"{a}{op}{b}", a, op, b)
        self.called_right, self.last_result, self.turns, self.done = False, None, 0, False
        return self.question[0]

    @property
    def value(self) -> int:
        _, a, op, b = self.question
        return _apply(a, op, b)

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset(seed) first")
        self.turns += 1
        text = action.strip()
        info = {"invalid": False, "success": False, "tool_call": False}
        if m := _CALL.match(text):
            a, op, b = int(m[1]), m[2], int(m[3])
            self.called_right = self.called_right or f"{a}{op}{b}" == self.question[0]
            self.done = self.turns >= self.max_turns
            return StepResult(f"={_apply(a, op, b)}", 0.0, self.done, {**info, "tool_call": True})
        if m := _ANSWER.match(text):
            self.done = True
            success = self.called_right and int(m[1]) == self.value
            reason = "" if success else ("answer_without_tool" if not self.called_right else "wrong_answer")
            return StepResult("correct" if success else "wrong", float(success), True,
                              {**info, "success": success, "reason": reason})
        self.done = self.turns >= self.max_turns
        return StepResult(USAGE, 0.0, self.done, {**info, "invalid": True})

    def expert_action(self) -> str:
        return f"answer({self.value})" if self.called_right else f"calc({self.question[0]})"
