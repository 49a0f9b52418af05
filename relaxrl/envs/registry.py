"""Env construction by name, as config files name them, or by a user's import path (envs/plugins.py)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.envs.calculator import CalculatorEnv
from relaxrl.envs.dataset import DatasetEnv
from relaxrl.envs.gridwalk import GridWalkEnv
from relaxrl.envs.guess import GuessEnv
from relaxrl.envs.json_answer import JsonAnswerEnv
from relaxrl.envs.mixture import MixtureEnv
from relaxrl.envs.plugins import USER_ENVS, check_env, import_modules, load_object

ENVS: dict[str, Callable[..., Any]] = {
    "arithmetic": ArithmeticEnv, "dataset": DatasetEnv, "mixture": MixtureEnv, "json_answer": JsonAnswerEnv,
}
# Multi-turn envs (relaxrl/envs/multiturn.py): one object per concurrent episode.
ENVS.update({"guess": GuessEnv, "calculator": CalculatorEnv, "gridwalk": GridWalkEnv})
BUILTIN_ENVS = tuple(ENVS) + ("custom",)


def make_env(name: str, *, target: Optional[str] = None, imports: Sequence[str] = (),
             args: Optional[dict] = None, prompt_template: Optional[str] = None, **kwargs: Any) -> Any:
    """The env ``name`` built with ``kwargs`` (plus ``args``); unknown kwargs raise ``TypeError``.

    ``imports`` are imported first (so their ``@register_env`` names exist); ``target`` is an import
    path that wins over ``name``. A user's env is checked against its Protocol. ``prompt_template``
    is the prompt encoder's (models/chat.py), not the env's."""
    del prompt_template
    import_modules(list(imports))
    kwargs = {**kwargs, **(args or {})}
    if target:
        origin = f"env.target={target!r}"
        factory = load_object(target, "env.target")
    elif name in ENVS:
        return ENVS[name](**kwargs)
    elif name in USER_ENVS:
        origin, factory = f"env.name={name!r}", USER_ENVS[name]
    elif name == "custom":
        raise ValueError("env=custom needs env.target=module:Class (e.g. env.target=my_task:ReverseTask), "
                         "or env.name=NAME registered with @register_env in a module of env.imports")
    else:
        hint = "" if imports else " (a name registered with @register_env needs its module in env.imports)"
        raise ValueError(f"unknown env {name!r}; valid: {sorted(ENVS) + sorted(USER_ENVS)}{hint}")
    if not callable(factory):
        raise TypeError(f"{origin} is {type(factory).__name__}, not an env class or factory")
    try:
        env = factory(**kwargs)
    except TypeError as e:  # a wrong key in env.args: say which config it came from
        raise TypeError(f"{origin}: building the env with env.args {sorted(kwargs)} failed: {e}") from e
    return check_env(env, f"{origin} ({getattr(factory, '__module__', '?')}."
                          f"{getattr(factory, '__qualname__', factory)})")
