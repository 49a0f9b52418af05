"""A structured-output task: arithmetic whose answer must be the JSON object ``{"answer":N}``.

Rewards exact correctness; ``response_info`` adds parse validity (the output parses as a JSON
object whose only key is ``"answer"`` with an integer value) and correctness, so a run can report
validity and accuracy on parsed outputs separately. Two warm-start sources build the toy of the λ*
issue: ``sft_pairs`` (always the clean format: the student) and ``teacher_pairs`` (a fraction
``teacher_format_noise`` drops the closing brace: a teacher that knows arithmetic better but is
less strict about the format than the student).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.envs.base import Task

# Characters of the output contract: every token of the answer except the digits.
STRUCTURAL_CHARS = '{}":answer'


@dataclass
class JsonAnswerEnvConfig:
    name: str = "json_answer"
    ops: list[str] = field(default_factory=lambda: ["+"])
    min_operand: int = 0
    max_operand: int = 9
    eval_size: int = 64
    domain: str = "json_answer"
    teacher_format_noise: float = 0.1  # fraction of teacher_pairs whose closing brace is dropped


def render(value: int) -> str:
    return json.dumps({"answer": value}, separators=(",", ":"))


def parse_answer(response: str) -> Optional[int]:
    """The integer of a valid ``{"answer": N}`` response, else None."""
    try:
        obj = json.loads(response.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or set(obj) != {"answer"}:
        return None
    value = obj["answer"]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class JsonAnswerEnv:
    """Arithmetic prompts (``3+4=``), answers as JSON (``{"answer":7}``)."""

    def __init__(self, name: str = "json_answer", ops: Sequence[str] = ("+",), min_operand: int = 0,
                 max_operand: int = 9, eval_size: int = 64, domain: str = "json_answer",
                 teacher_format_noise: float = 0.1) -> None:
        if not 0.0 <= teacher_format_noise <= 1.0:
            raise ValueError(f"teacher_format_noise must be in [0, 1], got {teacher_format_noise}")
        self.name, self.domain, self.teacher_format_noise = name, domain, teacher_format_noise
        self._arith = ArithmeticEnv(name=name, ops=ops, min_operand=min_operand, max_operand=max_operand,
                                    eval_size=eval_size, domain=domain)

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        for t in self._arith.tasks(split, seed):
            yield Task(task_id=t.task_id, prompt=t.prompt, answer=t.answer, domain=self.domain, meta=t.meta)

    def response_info(self, response: str, task: Task) -> dict[str, float]:
        value = parse_answer(response)
        return {"valid": float(value is not None), "correct": float(value is not None and str(value) == task.answer)}

    def verify(self, response: str, task: Task) -> float:
        return self.response_info(response, task)["correct"]

    def sft_pairs(self, n: int, seed: int) -> list[tuple[str, str]]:
        """Clean-format warm-start pairs (the student)."""
        return [(p, render(int(a))) for p, a in self._arith.sft_pairs(n, seed)]

    def teacher_pairs(self, n: int, seed: int) -> list[tuple[str, str]]:
        """Warm-start pairs for the teacher, a ``teacher_format_noise`` fraction missing the ``}``."""
        rng = random.Random(f"{self.name}:teacher-noise:{seed}")
        out = []
        for p, a in self._arith.sft_pairs(n, seed + 7_919):
            target = render(int(a))
            out.append((p, target[:-1] if rng.random() < self.teacher_format_noise else target))
        return out
