"""Gridwalk: walk an open grid to a goal, an env with real covariate shift for DAgger.

The grid has ``size x size`` cells named by row letter and column digit (``a0`` top left). Every
episode starts at ``a0``; its seed draws the goal. The observation is ``CELL>GOAL`` (``c4>f1``;
``obs=offset``: the goal's signed offset, ``+3+1``), the action one letter: ``u``, ``d``, ``l`` or
``r``; moving into the edge keeps the agent where it is. Reward 1 for reaching the goal within
``max_turns`` moves. With probability ``slip`` (default 0) a move goes in one of the other three
directions instead.

The expert steps rows first, then columns (``d`` until the goal's row, then ``r``), from any cell:
``u`` when below the goal's row, ``l`` when right of its column. Why DAgger matters here (Ross et
al., 2011): without slips the expert's walks from ``a0`` are the same 35 L-shaped walks (6x6), on
180 of the ``size**2 * (size**2 - 1)`` = 1,260 (cell, goal) states, and never contain ``u`` or
``l``; the student's own wrong moves are the only thing that leaves them (3 in 5 single wrong
moves do), and from there a student that learnt only the expert's states has no data, while the
expert knows the way back from every cell, so labels on the student's own states teach recovery.
Slips would push the expert off its path too and so give behaviour cloning recovery data for free
(with ``slip=0.3`` 7% of the expert's labels are ``u``/``l``). ``obs=offset`` makes every state
past the goal's row or column show a ``-`` (the ones demonstrations never hold) but also makes the
on-path rule trivial: a tiny student cloning it makes no mistakes to recover from (docs/dagger.md).
"""

from __future__ import annotations

import random
import string

from relaxrl.envs.multiturn import StepResult

MOVES = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}
ROWS = string.ascii_lowercase


def cell_name(cell: tuple[int, int]) -> str:
    return f"{ROWS[cell[0]]}{cell[1]}"


OBSERVATIONS = ("cells", "offset")


def offset_text(cell: tuple[int, int], goal: tuple[int, int]) -> str:
    """The goal's offset from ``cell``, rows then columns, signed: ``+2+3`` (2 down, 3 right), ``-1+0``."""
    return f"{goal[0] - cell[0]:+d}{goal[1] - cell[1]:+d}"


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

    def __init__(self, name: str = "gridwalk", size: int = 6, slip: float = 0.0, max_turns: int = 20,
                 max_action_tokens: int = 2, obs: str = "cells") -> None:
        if not 2 <= size <= 10:  # one row letter and one column digit per cell
            raise ValueError(f"size must be in [2, 10], got {size}")
        if not 0.0 <= slip < 1.0:
            raise ValueError(f"slip must be in [0, 1), got {slip}")
        if max_turns < 1 or max_action_tokens < 1:
            raise ValueError(f"max_turns and max_action_tokens must be >= 1, got {max_turns}, {max_action_tokens}")
        if obs not in OBSERVATIONS:
            raise ValueError(f"obs must be one of {OBSERVATIONS}, got {obs!r}")
        self.name, self.size, self.slip, self.obs = name, int(size), float(slip), obs
        self.max_turns, self.max_action_tokens = int(max_turns), int(max_action_tokens)
        self.start = (0, 0)
        self.cell, self.goal, self.turns, self.done = self.start, (size - 1, size - 1), 0, True
        self._rng = random.Random(0)

    def _observe(self) -> str:
        if self.obs == "offset":
            return offset_text(self.cell, self.goal)
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
