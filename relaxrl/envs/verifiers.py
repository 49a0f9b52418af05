"""Reward functions ``(response, answer) -> float`` for single-turn tasks, looked up by name, by a
name a user registered (``@register_verifier``), or by import path (``my_module:my_reward``)."""

from __future__ import annotations

import math
from typing import Callable, Optional

Verifier = Callable[[str, str], float]


def exact(response: str, answer: str) -> float:
    """1.0 when the stripped response equals the stripped answer."""
    return float(response.strip() == answer.strip())


def _to_float(text: str) -> Optional[float]:
    try:
        return float(text.strip())
    except ValueError:
        return None


def numeric(response: str, answer: str) -> float:
    """1.0 when both parse as numbers equal within 1e-6; anything unparsable scores 0.0."""
    got, want = _to_float(response), _to_float(answer)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=0.0, abs_tol=1e-6))


def contains(response: str, answer: str) -> float:
    """1.0 when the (non-empty) stripped answer occurs anywhere in the response."""
    want = answer.strip()
    return float(bool(want) and want in response)


def python_tests(response: str, answer: str) -> float:
    """1.0 when the response's code passes the task's test code, run in a sandboxed subprocess."""
    from relaxrl.envs.sandbox import python_tests as run_tests

    return run_tests(response, answer)


def math_answer(response: str, answer: str) -> float:
    """1.0 when the response's final answer (last \\boxed{}, ``####``, "the answer is") equals the
    answer symbolically (math-verify); no final answer scores 0.0."""
    from relaxrl.envs.math_answer import math_reward

    return math_reward(response, answer)


def answer_format(response: str, answer: str) -> float:
    """1.0 when the response states a final answer in a form ``math`` extracts, whatever its value."""
    from relaxrl.envs.math_answer import extract_answer

    return float(extract_answer(response) is not None)


VERIFIERS: dict[str, Verifier] = {"exact": exact, "numeric": numeric, "contains": contains,
                                  "python_tests": python_tests, "math": math_answer, "format": answer_format}


def get_verifier(name: str, key: str = "env.verifier") -> Verifier:
    """A built-in verifier, one registered with ``@register_verifier``, or one at an import path."""
    from relaxrl.envs.plugins import USER_VERIFIERS, check_verifier, is_import_path, load_object

    if name in VERIFIERS:
        return VERIFIERS[name]
    if name in USER_VERIFIERS:
        return check_verifier(USER_VERIFIERS[name], f"{key}={name!r}")
    if is_import_path(name):
        return check_verifier(load_object(name, key), f"{key}={name!r}")
    raise ValueError(f"unknown verifier {name!r} ({key}); valid: {sorted(VERIFIERS) + sorted(USER_VERIFIERS)}, "
                     "an import path such as my_module:my_reward, or a @register_verifier name whose module "
                     "is in env.imports")
