"""A user's own single-turn task and reward, outside the RelaxRL package: reverse a short word.

    PYTHONPATH=examples/custom_task python -m relaxrl.train +experiment=quickstart env=custom \
        env.target=my_task:ReverseTask rollout.max_new_tokens=4 model.warm_start.steps=15 trainer.steps=120

An env is any class with ``tasks(split, seed)`` and ``verify(response, task)`` (the SingleTurnEnv
Protocol, relaxrl/envs/base.py); ``sft_pairs`` is optional (warm start). ``@register_env`` also lets
a config name it: ``env=custom env.imports=[my_task] env.name=reverse``; constructor arguments
come from ``env.args`` (``+env.args.length=4``). See docs/custom_tasks.md.
"""

import itertools
import random

from relaxrl.envs.base import Task
from relaxrl.envs.plugins import register_env


def reverse_reward(response: str, answer: str) -> float:
    """Partial credit: the fraction of the answer's characters in place (1.0 only for an exact match)."""
    response = response.strip()
    hits = sum(a == b for a, b in zip(response, answer))
    return hits / max(len(answer), len(response), 1)


@register_env("reverse")
class ReverseTask:
    def __init__(self, name: str = "reverse", letters: str = "abcd", length: int = 3, eval_size: int = 32):
        self.name, self.letters, self.length, self.eval_size = name, letters, length, eval_size

    def _word(self, rng: random.Random) -> str:
        return "".join(rng.choice(self.letters) for _ in range(self.length))

    def tasks(self, split: str, seed: int):
        rng = random.Random(f"{split}:{seed}")
        for i in itertools.count() if split == "train" else range(self.eval_size):
            word = self._word(rng)
            yield Task(task_id=f"{split}-{i}", prompt=f"{word}>", answer=word[::-1], domain="reverse")

    def verify(self, response: str, task: Task) -> float:
        return reverse_reward(response, task.answer)

    def sft_pairs(self, n: int, seed: int):
        rng = random.Random(f"sft:{seed}")
        return [(f"{w}>", w[::-1]) for w in (self._word(rng) for _ in range(n))]
