"""User envs and verifiers without editing RelaxRL: by import path, or by a name registered in user code.

Ways in (see docs/custom_tasks.md):

- import path: ``env=custom env.target=my_task:ReverseTask`` (``module:attr`` or ``module.attr``),
  ``env=dataset env.verifier=my_rewards:score``;
- a name registered by a decorator in a module the config imports:
  ``env=custom env.imports=[my_task] env.name=reverse`` with ``@register_env("reverse")`` in
  ``my_task``, or ``env.verifier=my_score`` with ``@register_verifier("my_score")``.

Whatever comes in is checked against its Protocol (``SingleTurnEnv``, ``MultiTurnEnv``, ``Verifier``)
and refused with an error naming what is missing. No Ray here: envs are built in every role's process,
so the module must be importable there too (``PYTHONPATH``, or an installed package).
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

# Filled by the decorators below, read by relaxrl.envs.registry.make_env and verifiers.get_verifier.
USER_ENVS: dict[str, Callable[..., Any]] = {}
USER_VERIFIERS: dict[str, Callable[[str, str], Any]] = {}

# Protocol members as (name, positional parameters after self) - what the framework calls.
SINGLE_TURN_METHODS = (("tasks", ("split", "seed")), ("verify", ("response", "task")))
MULTI_TURN_METHODS = (("reset", ("seed",)), ("step", ("action",)), ("expert_action", ()))
MULTI_TURN_ATTRS = ("max_turns", "max_action_tokens")


@dataclass
class CustomEnvConfig:
    """``env=custom``: a user's env class (or factory) and its own keys, passed as keyword arguments."""

    name: str = "custom"  # a name registered with @register_env, or a label for `target`
    target: Optional[str] = None  # "my_module:MyEnv" or "my_module.MyEnv"; wins over a registered name
    imports: list[str] = field(default_factory=list)  # modules imported first (their decorators register)
    args: dict[str, Any] = field(default_factory=dict)  # the env's constructor kwargs (its own config keys)
    prompt_template: Optional[str] = None  # e.g. "Question: {prompt}\nAnswer:" (see models/chat.py)


def _register(table: dict, kind: str, name: str, builtins: Sequence[str]) -> Callable:
    if not isinstance(name, str) or not name:
        raise TypeError(f"@register_{kind} needs a name, e.g. @register_{kind}('my_{kind}')")
    if name in builtins:
        raise ValueError(f"@register_{kind}({name!r}): {name!r} is a built-in {kind}; choose another name")

    def decorate(obj: Callable) -> Callable:
        old = table.get(name)
        # Re-importing the same file is fine, even under another module name (a path on sys.path
        # and a package path to the same file).
        if old is not None and _defined_at(old) != _defined_at(obj):
            raise ValueError(f"@register_{kind}({name!r}): already registered by {_qualname(old)}")
        table[name] = obj
        return obj

    return decorate


def register_env(name: str) -> Callable:
    """Class (or factory) decorator: ``env.name=NAME`` builds it, once its module is in ``env.imports``."""
    from relaxrl.envs.registry import BUILTIN_ENVS

    return _register(USER_ENVS, "env", name, BUILTIN_ENVS)


def register_verifier(name: str) -> Callable:
    """Function decorator: ``env.verifier=NAME`` scores with ``fn(response, answer) -> float``."""
    from relaxrl.envs.verifiers import VERIFIERS

    return _register(USER_VERIFIERS, "verifier", name, VERIFIERS)


def _defined_at(obj: Any) -> tuple:
    """(source file, qualified name) of a class or function, independent of the name it was imported by."""
    try:
        source = inspect.getsourcefile(obj)
    except (TypeError, OSError):  # defined in no file (a REPL, a dynamic class)
        source = None
    return (os.path.realpath(source) if source else getattr(obj, "__module__", None),
            getattr(obj, "__qualname__", repr(obj)))


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def is_import_path(text: str) -> bool:
    return ":" in text or "." in text


def import_modules(modules: Sequence[str], key: str = "env.imports") -> None:
    """Import each module (their ``@register_*`` decorators run); a missing one names ``key``."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ImportError(f"{key}: cannot import module {name!r} ({e}); is its directory on PYTHONPATH "
                              "(e.g. PYTHONPATH=examples/custom_task), or the package installed?") from e


def load_object(path: str, key: str) -> Any:
    """The object at ``module:attr`` or ``module.attr`` (``attr`` may be dotted with ``:``)."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{key}={path!r} is not an import path; expected 'module:Name' or 'module.Name'")
    import_modules([module_name], key)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"{key}={path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _signature_problem(fn: Any, params: Sequence[str]) -> Optional[str]:
    """Why ``fn`` cannot be called with len(params) positional arguments (None if it can)."""
    if not callable(fn):
        return "is not callable"
    try:
        inspect.signature(fn).bind(*params)
    except TypeError as e:
        return f"cannot be called as ({', '.join(params)}): {e}"
    except ValueError:  # no signature (a builtin): trust it
        return None
    return None


def _where(obj: Any, origin: str) -> str:
    return origin or _qualname(type(obj))


def check_env(env: Any, origin: str = "") -> Any:
    """``env`` itself if it implements SingleTurnEnv or MultiTurnEnv, else an error naming what is missing.

    An object with any multi-turn method is judged as a MultiTurnEnv, the rest as a SingleTurnEnv."""
    multi = any(hasattr(env, m) for m, _ in MULTI_TURN_METHODS)
    protocol, methods = ("MultiTurnEnv", MULTI_TURN_METHODS) if multi else ("SingleTurnEnv", SINGLE_TURN_METHODS)
    missing = []
    for name, params in methods:
        sig = f"{name}({', '.join(params)})"
        if not hasattr(env, name):
            missing.append(f"missing method {sig}")
        else:
            problem = _signature_problem(getattr(env, name), params)
            if problem:
                missing.append(f"method {name} {problem}")
    if multi:
        missing += [f"missing attribute {a} (int)" for a in MULTI_TURN_ATTRS if not hasattr(env, a)]
    if missing:
        module = "relaxrl.envs.multiturn" if multi else "relaxrl.envs.base"
        raise TypeError(f"{_where(env, origin)} does not implement {protocol} ({module}): " + "; ".join(missing))
    return env


def check_verifier(fn: Any, origin: str = "") -> Any:
    """``fn`` itself if it can be called as ``fn(response, answer)``, else an error saying why."""
    problem = _signature_problem(fn, ("response", "answer"))
    if problem:
        raise TypeError(f"{origin or _qualname(fn)} does not implement Verifier "
                        f"(fn(response: str, answer: str) -> float): it {problem}")
    return fn
