"""The math verifier: final-answer extraction, symbolic equivalence, its timeout, and weighted components."""

import asyncio
import json
import threading

import pytest

from relaxrl.envs.base import Task
from relaxrl.envs.dataset import DatasetEnv
from relaxrl.envs.guarded import GuardedVerifier
from relaxrl.envs.math_answer import extract_answer, last_boxed, math_reward
from relaxrl.envs.verifiers import get_verifier
from relaxrl.sample import Sample


@pytest.mark.parametrize("response, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"first \boxed{3}, then corrected: \boxed{4}", "4"),  # the last box
    (r"\boxed{\left\{1, \frac{2}{3}\right\}} done", r"\left\{1, \frac{2}{3}\right\}"),  # nested braces
    (r"\boxed{x} and an unclosed \boxed{y", "x"),  # a box whose braces never close is not an answer
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1\n#### -5 ", "-5"),
    ("The answer is $\\frac{3}{4}$.", r"\frac{3}{4}"),
    ("so the final answer is: 12", "12"),
    ("I think it is 12", None),
    (r"\boxed{}", None),
    ("", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_last_boxed_handles_fbox_and_spaces():
    assert last_boxed(r"\fbox {7} \boxed{ 8 }") == "8"


# (response, gold answer, reward): what math-verify decides, symbolically, not by string.
CASES = [
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("#### 1/2", "0.5", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (r"\boxed{\frac12}", "1/2", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", 1.0),
    (r"\boxed{0.333}", "1/3", 0.0),  # rounding is not equality
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{-3}", "3", 0.0),  # the sign matters
    (r"\boxed{3.0}", "3", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),  # units are normalised away
    ("the answer is 5 cm", "5", 1.0),
    # Percentages, as math-verify reads them: LaTeX's \% is dropped like a unit, a plain % divides by 100.
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{50\%}", "0.5", 0.0),
    ("#### 50%", "0.5", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{\{2, 1\}}", r"\{1, 2\}", 1.0),  # sets
    (r"\boxed{[1, 2)}", "[1,2)", 1.0),  # intervals
    (r"\boxed{(1, 2)}", "[1,2]", 0.0),  # open vs closed
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{\pi}", "3.14159", 0.0),
    (r"\boxed{3} wait, no: \boxed{4}", "4", 1.0),  # the last box counts
    (r"\boxed{4} wait, no: \boxed{3}", "4", 0.0),
    ("I believe it is 4", "4", 0.0),  # no final answer stated -> 0
    ("", "4", 0.0),
    (r"\boxed{abc}", "4", 0.0),
    (r"\boxed{72}", "Natalia sold 48+24 clips.\n#### 72", 1.0),  # a worked solution's own final answer
    (r"\boxed{7}", r"The result is \boxed{7}", 1.0),
]


@pytest.mark.parametrize("response, gold, reward", CASES)
def test_math_verifier_table(response, gold, reward):
    assert math_reward(response, gold) == reward
    assert get_verifier("math")(response, gold) == reward


def test_format_component_scores_a_stated_answer_whatever_its_value():
    fmt = get_verifier("format")
    assert fmt(r"\boxed{9}", "4") == 1.0 and fmt("#### 9", "4") == 1.0 and fmt("it is 4", "4") == 0.0


def _data(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1/2"}) + "\n" for i in range(4)))
    return str(path)


def test_reward_weights_sum_correctness_and_format(tmp_path):
    env = DatasetEnv(_data(tmp_path), verifier="math", reward_weights={"correct": 1.0, "format": 0.1},
                     eval_fraction=0.0)
    task = Task("t", "q", "1/2")
    assert env.verify(r"\boxed{0.5}", task) == pytest.approx(1.1)
    assert env.verify(r"\boxed{0.7}", task) == pytest.approx(0.1)  # well-formed but wrong
    assert env.verify("0.5", task) == 0.0  # right number, no stated final answer
    assert DatasetEnv(_data(tmp_path), verifier="math", eval_fraction=0.0).verify(r"\boxed{0.5}", task) == 1.0


def test_reward_weights_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown verifier 'style' \(env.reward_weights.style\)"):
        DatasetEnv(_data(tmp_path), reward_weights={"correct": 1.0, "style": 0.5}, eval_fraction=0.0)
    with pytest.raises(ValueError, match="env.reward_weights.format must be a number"):
        DatasetEnv(_data(tmp_path), reward_weights={"format": "high"}, eval_fraction=0.0)


def test_a_hanging_math_verify_call_counts_as_a_verifier_timeout(monkeypatch):
    """math-verify's own signal timeouts are off (verifiers run in threads): the guard's timeout cuts
    a hung call off and counts it like any verifier's."""
    import math_verify

    release = threading.Event()
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: release.wait(30) and False)
    verify = get_verifier("math")
    guard = GuardedVerifier(lambda response, task: verify(response, task.answer), timeout_s=0.3)
    task = Task("t", "q", "1/2")
    samples = [Sample(uid=f"g/{i}", group_id="g", index=i, prompt_ids=[1], response_text=text)
               for i, text in enumerate([r"\boxed{0.5}", "no answer here"])]
    try:
        out = asyncio.run(guard.score(samples, task))
    finally:
        release.set()
    assert out[0].reward is None and out[0].reward_info["error"] == "verifier_timeout"
    assert out[1].reward == 0.0  # no answer: never reaches math-verify, scored at once


def test_math_verifier_works_in_the_reward_roles_threads():
    """The guard runs verifiers in a thread pool, where math-verify's signal-based timeouts cannot
    run (left on, every answer would score 0 there)."""
    verify = get_verifier("math")
    guard = GuardedVerifier(lambda response, task: verify(response, task.answer), timeout_s=30)
    samples = [Sample(uid=f"g/{i}", group_id="g", index=i, prompt_ids=[1], response_text=text)
               for i, text in enumerate([r"\boxed{0.5}", r"\boxed{0.7}", r"#### \frac{2}{4}"])]
    out = asyncio.run(guard.score(samples, Task("t", "q", "1/2")))
    assert [s.reward for s in out] == [1.0, 0.0, 1.0] and not any(s.reward_info for s in out)
