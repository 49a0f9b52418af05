"""Gridwalk: walk an open grid to a goal while moves slip, an env with real covariate shift.

The grid has ``size x size`` cells named by row letter and column digit (``a0`` top left). Every
episode starts at ``a0``; its seed draws the goal. The observation is ``CELL>GOAL`` (``c4>f1``),
the action one letter: ``u``, ``d``, ``l`` or ``r``. With probability ``slip`` a move goes in one
of the other three directions instead; moving into the edge keeps the agent where it is. Reward 1
for reaching the goal within ``max_turns`` moves.

The expert steps rows first, then columns (``d`` until the goal's row, then ``r``), from any cell:
``u`` when below the goal's row, ``l`` when right of its column. Why DAgger matters here (Ross et
al., 2011): from ``a0`` the expert only ever moves down and right, so its trajectories cover a thin
L of the ``size**2 * (size**2 - 1)`` (cell, goal) states and almost never show ``u`` or ``l``. One
slip or one wrong move past the goal's row or column puts the agent where demonstrations rarely or
never go, and a student that keeps moving down or right from there walks into the edge and stays
stuck: errors compound over a horizon of up to ``2 * (size - 1)`` moves plus the slips. The
expert knows the way back from every cell, so labels on the student's own states teach recovery.
"""

from __future__ import annotations

import random
import string

from relaxrl.envs.multiturn import StepResult

MOVES = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}
ROWS = string.ascii_lowercase


def cell_name(cell: tuple[int, int]) -> str:
    return f"{ROWS[cell[0]]}{cell[1]}"


def expert_move(cell: tuple[int, int], goal: tuple[int, int]) -> str:
    """Rows first, then columns: the step towards ``goal`` from any cell (``cell != goal``)."""
    (r, c), (gr, gc) = cell, goal
    if r != gr:
        return "d" if r < gr else "u"
    if c != gc:
        return "r" if c < gc else "l"
    raise ValueError(f"the agent is at the goal {cell_name(goal)}: no move to label")


class GridWalkEnv:
    """Implements ``MultiTurnEnv``."""

    def __init__(self, name: str = "gridwalk", size: int = 6, slip: float = 0.3, max_turns: int = 20,
                 max_action_tokens: int = 2) -> None:
        if not 2 <= size <= 10:  # one row letter and one column digit per cell
            raise ValueError(f"size must be in [2, 10], got {size}")
        if not 0.0 <= slip < 1.0:
            raise ValueError(f"slip must be in [0, 1), got {slip}")
        if max_turns < 1 or max_action_tokens < 1:
            raise ValueError(f"max_turns and max_action_tokens must be >= 1, got {max_turns}, {max_action_tokens}")
        self.name, self.size, self.slip = name, int(size), float(slip)
        self.max_turns, self.max_action_tokens = int(max_turns), int(max_action_tokens)
        self.start = (0, 0)
        self.cell, self.goal, self.turns, self.done = self.start, (size - 1, size - 1), 0, True
        self._rng = random.Random(0)

    def _observe(self) -> str:
        return f"{cell_name(self.cell)}>{cell_name(self.goal)}"

    def reset(self, seed: int) -> str:
        rng = random.Random(f"{self.name}:{self.size}:{seed}")
        cells = [(r, c) for r in range(self.size) for c in range(self.size) if (r, c) != self.start]
        self.goal = rng.choice(cells)
        self._rng = rng  # the episode's slips follow from the same seed
        self.cell, self.turns, self.done = self.start, 0, False
        return self._observe()

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset(seed) first")
        self.turns += 1
        out_of_turns = self.turns >= self.max_turns
        move = action.strip()
        # Two draws every turn whatever was played, so a seed's slips do not depend on the actions.
        slipped, other = self._rng.random() < self.slip, self._rng.randrange(3)
        if move not in MOVES:
            self.done = out_of_turns
            return StepResult(f"udlr? {self._observe()}", 0.0, self.done,
                              {"invalid": True, "success": False, "slipped": False})
        if slipped:
            move = [d for d in MOVES if d != move][other]
        dr, dc = MOVES[move]
        r, c = self.cell[0] + dr, self.cell[1] + dc
        if 0 <= r < self.size and 0 <= c < self.size:
            self.cell = (r, c)
        if self.cell == self.goal:
            self.done = True
            return StepResult("goal", 1.0, True, {"invalid": False, "success": True, "slipped": slipped})
        self.done = out_of_turns
        return StepResult(self._observe(), 0.0, self.done, {"invalid": False, "success": False, "slipped": slipped})

    def expert_action(self) -> str:
        return expert_move(self.cell, self.goal)
