"""Env construction by name, as config files name them."""

from __future__ import annotations

from typing import Any, Callable

from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.envs.calculator import CalculatorEnv
from relaxrl.envs.dataset import DatasetEnv
from relaxrl.envs.guess import GuessEnv
from relaxrl.envs.json_answer import JsonAnswerEnv
from relaxrl.envs.mixture import MixtureEnv

ENVS: dict[str, Callable[..., Any]] = {
    "arithmetic": ArithmeticEnv, "dataset": DatasetEnv, "mixture": MixtureEnv, "json_answer": JsonAnswerEnv,
}
# Multi-turn envs (relaxrl/envs/multiturn.py): one object per concurrent episode.
ENVS.update({"guess": GuessEnv, "calculator": CalculatorEnv})


def make_env(name: str, **kwargs: Any) -> Any:
    """The env registered as ``name`` built with ``kwargs``; unknown kwargs raise ``TypeError``."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; valid: {sorted(ENVS)}")
    return ENVS[name](**kwargs)
