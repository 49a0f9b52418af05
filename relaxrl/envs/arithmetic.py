"""Arithmetic problems ("3+4=" -> "7"): a tiny env whose difficulty is set by operand range and ops."""

from __future__ import annotations

import itertools
import random
from typing import Iterator, Sequence

from relaxrl.envs.base import Task
from relaxrl.envs.verifiers import exact

VALID_OPS = ("+", "-", "*")
SPLITS = ("train", "eval")


class ArithmeticEnv:
    """Two-operand integer arithmetic; rewards exact matches of the stripped response."""

    def __init__(
        self,
        name: str = "arithmetic",
        ops: Sequence[str] = ("+",),
        min_operand: int = 0,
        max_operand: int = 9,
        eval_size: int = 64,
        domain: str = "arithmetic",
    ) -> None:
        ops = tuple(ops)
        if not ops:
            raise ValueError(f"ops must not be empty; choose from {list(VALID_OPS)}")
        bad = [op for op in ops if op not in VALID_OPS]
        if bad:
            raise ValueError(f"unknown op(s) {bad}; valid: {list(VALID_OPS)}")
        if min_operand > max_operand:
            raise ValueError(f"min_operand={min_operand} is greater than max_operand={max_operand}")
        if eval_size < 1:
            raise ValueError(f"eval_size must be >= 1, got {eval_size}")
        self.name, self.ops, self.domain = name, ops, domain
        self.min_operand, self.max_operand, self.eval_size = int(min_operand), int(max_operand), int(eval_size)

    def _draw(self, rng: random.Random) -> tuple[str, str, dict]:
        """One (prompt, answer, meta); subtraction orders operands so results stay non-negative."""
        op = rng.choice(self.ops)
        a = rng.randint(self.min_operand, self.max_operand)
        b = rng.randint(self.min_operand, self.max_operand)
        if op == "-" and a < b:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a}{op}{b}=", str(value), {"a": a, "b": b, "op": op}

    def _rng(self, purpose: str, seed: int) -> random.Random:
        # String seeds are hashed deterministically (unlike tuples), one stream per purpose.
        return random.Random(f"{self.name}:{purpose}:{seed}")

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        """Endless ``train`` stream or ``eval_size`` fixed ``eval`` tasks, deterministic in ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
        rng = self._rng(split, seed)
        count = itertools.count() if split == "train" else range(self.eval_size)
        for i in count:
            prompt, answer, meta = self._draw(rng)
            yield Task(task_id=f"{split}-{i}", prompt=prompt, answer=answer, domain=self.domain, meta=meta)

    def verify(self, response: str, task: Task) -> float:
        return exact(response, task.answer)

    def sft_pairs(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` (prompt, answer) pairs for warm start, from their own stream."""
        rng = self._rng("sft", seed)
        return [self._draw(rng)[:2] for _ in range(n)]
