"""Final-answer extraction and symbolic equivalence for math tasks (the ``math`` verifier).

The final answer is the last ``\\boxed{...}`` (nested braces kept), else the text after the last
``####``, else what follows the last "the answer is". It is compared with the task's answer by HF's
``math-verify`` (sympy): ``\\frac{1}{2}``, ``1/2``, ``0.5`` and ``\\dfrac12`` are equal, sets and
intervals compare as sets and intervals, units and ``\\%`` are normalised away.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread; verifiers run
in the reward role's thread pool, so they are off here and a call that hangs is cut off by the
reward role's guard (``reward.timeout_s``, envs/guarded.py) and counted as ``verifier_timeout``.
"""

from __future__ import annotations

import re
from typing import Optional

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` whose braces close, nested braces included."""
    for match in reversed(list(_BOX.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _clean(answer: str) -> Optional[str]:
    """An answer phrase without surrounding ``$``, trailing full stop or whitespace; None if empty."""
    answer = answer.strip().rstrip(".").strip().strip("$").strip()
    return answer or None


def extract_answer(response: str) -> Optional[str]:
    """The response's final answer (see the module docstring), or None when it states none."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed or None
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(response)
        if found:
            return _clean(found[-1])
    return None


def _math_verify():
    try:
        import math_verify
        from math_verify import grader, parser
    except ImportError as e:  # a dependency of the package; only a broken install lacks it
        raise ImportError("the math verifier needs the math-verify package: "
                          "pip install 'math-verify>=0.9,<0.10'") from e
    # Its timeouts are off on purpose (see above): do not warn about it on every replica.
    parser.TIMEOUT_WARNING_SHOWN = grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify


def math_equal(predicted: str, gold: str) -> bool:
    """Whether two answer expressions (LaTeX or plain) are mathematically equal."""
    mv = _math_verify()
    parse = lambda s: mv.parse(f"${s}$", parsing_timeout=None)  # noqa: E731  ($: read as LaTeX math)
    gold_parsed, pred_parsed = parse(gold), parse(predicted)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer equals ``answer``: a bare answer, or a worked solution
    whose own final answer is extracted the same way (e.g. GSM8K's ``... #### 72``)."""
    predicted = extract_answer(response)
    if predicted is None:
        return 0.0
    gold = extract_answer(answer) or _clean(answer) or ""
    return float(math_equal(predicted, gold))
