"""Reward functions ``(response, answer) -> float`` for single-turn tasks, looked up by name."""

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


VERIFIERS: dict[str, Verifier] = {"exact": exact, "numeric": numeric, "contains": contains,
                                  "python_tests": python_tests}


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; valid: {sorted(VERIFIERS)}")
    return VERIFIERS[name]
