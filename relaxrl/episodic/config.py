"""Config schemas of the multi-turn envs and of DAgger, registered with Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from relaxrl.algorithms.dagger import DAggerConfig


@dataclass
class GuessEnvConfig:
    name: str = "guess"
    high: int = 15  # secret in 1..high
    max_turns: int = 5
    max_action_tokens: int = 4


@dataclass
class CalculatorEnvConfig:
    name: str = "calculator"
    ops: tuple[str, ...] = ("+",)
    min_operand: int = 10
    max_operand: int = 99
    max_turns: int = 4
    max_action_tokens: int = 14


@dataclass
class GridwalkEnvConfig:
    name: str = "gridwalk"
    size: int = 6  # size x size cells, a0 top left
    slip: float = 0.0  # probability a move goes another way (> 0 also gives the expert's demos recovery states)
    max_turns: int = 20
    max_action_tokens: int = 2
    obs: str = "cells"  # cells: CELL>GOAL | offset: the goal's signed offset (+2+3)


def register_episodic_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="algorithm", name="dagger_schema", node=DAggerConfig)
    cs.store(group="env", name="guess_schema", node=GuessEnvConfig)
    cs.store(group="env", name="calculator_schema", node=CalculatorEnvConfig)
    cs.store(group="env", name="gridwalk_schema", node=GridwalkEnvConfig)
