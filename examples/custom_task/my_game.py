"""A user's own multi-turn env (the MultiTurnEnv Protocol, relaxrl/envs/multiturn.py): say whether
each of three numbers is even or odd, one per turn; the expert always knows.

    PYTHONPATH=examples/custom_task python -m relaxrl.train +experiment=dagger_toy env=custom env.target=my_game:Parity
"""

import random

from relaxrl.envs.multiturn import StepResult


class Parity:
    def __init__(self, name: str = "parity", rounds: int = 3, max_action_tokens: int = 5):
        self.name, self.rounds = name, rounds
        self.max_turns, self.max_action_tokens = rounds, max_action_tokens

    def reset(self, seed: int) -> str:
        rng = random.Random(f"{self.name}:{seed}")
        self.numbers, self.turn, self.right = [rng.randint(0, 99) for _ in range(self.rounds)], 0, 0
        return f"{self.numbers[0]}: even or odd?"

    def step(self, action: str) -> StepResult:
        self.right += action.strip() == self.expert_action()
        self.turn += 1
        if self.turn == self.rounds:  # the reward comes at the end: the fraction said right
            return StepResult("done", self.right / self.rounds, True, {"success": self.right == self.rounds})
        return StepResult(f"{self.numbers[self.turn]}: even or odd?", 0.0, False, {"success": False})

    def expert_action(self) -> str:
        return "even" if self.numbers[self.turn] % 2 == 0 else "odd"
