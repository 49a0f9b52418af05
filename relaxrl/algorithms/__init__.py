"""RL algorithms: pure tensor code behind the ``Algorithm`` protocol, picked by name from config."""

from relaxrl.algorithms import grpo  # noqa: F401  (registers "grpo")
from relaxrl.algorithms import mopd  # noqa: F401  (registers "mopd")
from relaxrl.algorithms import extrapolated_opd  # noqa: F401  (registers "extrapolated_opd")
from relaxrl.algorithms import dagger  # noqa: F401  (registers "dagger")
from relaxrl.algorithms.registry import available_algorithms, make_algorithm, register_algorithm

__all__ = ["available_algorithms", "make_algorithm", "register_algorithm"]
