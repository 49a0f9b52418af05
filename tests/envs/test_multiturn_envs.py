"""Multi-turn envs: expert play, invalid actions, episode rendering and loss masks."""

import pytest

from relaxrl.envs.calculator import USAGE, CalculatorEnv
from relaxrl.envs.guess import GuessEnv
from relaxrl.envs.registry import make_env


def play_expert(env, seed):
    env.reset(seed)
    for turn in range(1, env.max_turns + 1):
        r = env.step(env.expert_action())
        if r.done:
            return r, turn
    raise AssertionError("episode did not end within max_turns")


@pytest.mark.parametrize("seed", range(40))
def test_guess_expert_wins_within_log2_turns(seed):
    r, turns = play_expert(GuessEnv(high=15, max_turns=5), seed)
    assert r.reward == 1.0 and r.info["success"] and turns <= 4  # ceil(log2(16))


def test_guess_hints_and_expert_recovers_from_a_wasted_guess():
    env = GuessEnv(high=15)
    env.reset(3)
    secret = env.secret
    wrong = 1 if secret != 1 else 15
    r = env.step(str(wrong))
    assert r.observation == ("higher" if wrong < secret else "lower") and not r.done
    # The expert's next guess is the midpoint of the interval still consistent with the hint.
    lo, hi = (2, 15) if wrong < secret else (1, 14)
    assert env.expert_action() == str((lo + hi) // 2)


@pytest.mark.parametrize("action", ["", "seven", "0", "16", "3.5", "<eos>"])
def test_guess_invalid_action_gets_an_explanation_not_a_crash(action):
    env = GuessEnv(high=15, max_turns=5)
    env.reset(0)
    r = env.step(action)
    assert r.observation == "invalid: say a number 1-15" and r.reward == 0.0 and r.info["invalid"]
    assert not r.done


def test_guess_ends_after_max_turns_and_refuses_more_steps():
    env = GuessEnv(high=15, max_turns=2)
    env.reset(0)
    wrong = "1" if env.secret != 1 else "2"
    assert not env.step(wrong).done
    r = env.step(wrong)
    assert r.done and r.reward == 0.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step("3")


@pytest.mark.parametrize("seed", range(20))
def test_calculator_expert_calls_the_tool_then_answers(seed):
    env = CalculatorEnv(ops=("+", "-", "*"))
    q = env.reset(seed)
    assert env.expert_action() == f"calc({q})"
    r = env.step(env.expert_action())
    assert r.observation == f"={env.value}" and r.info["tool_call"] and not r.done
    assert env.expert_action() == f"answer({env.value})"
    r = env.step(env.expert_action())
    assert r.done and r.reward == 1.0 and r.info["success"]


def test_calculator_answer_without_the_tool_fails_even_if_right():
    env = CalculatorEnv()
    env.reset(1)
    r = env.step(f"answer({env.value})")
    assert r.done and r.reward == 0.0 and r.info["reason"] == "answer_without_tool"


def test_calculator_wrong_arguments_then_recovery():
    env = CalculatorEnv()
    q = env.reset(2)
    a, b = q.split("+")
    r = env.step(f"calc({a}+{int(b) + 1})")  # mis-copied argument: the tool answers the wrong sum
    assert r.observation == f"={int(a) + int(b) + 1}" and not r.done
    assert env.expert_action() == f"calc({q})"  # the expert's label there: call again, correctly
    env.step(env.expert_action())
    assert env.step(f"answer({env.value})").reward == 1.0


@pytest.mark.parametrize("action", ["calc 1+2", "calc(1/2)", "answer(x)", "hello", ""])
def test_calculator_invalid_action_gets_usage(action):
    env = CalculatorEnv(max_turns=3)
    env.reset(0)
    r = env.step(action)
    assert r.observation == USAGE and r.info["invalid"] and not r.done


def test_calculator_wrong_answer_and_bad_config():
    env = CalculatorEnv()
    env.reset(0)
    env.step(env.expert_action())
    r = env.step(f"answer({env.value + 1})")
    assert r.done and r.reward == 0.0 and r.info["reason"] == "wrong_answer"
    with pytest.raises(ValueError, match="ops"):
        CalculatorEnv(ops=("/",))
    with pytest.raises(ValueError, match="high"):
        GuessEnv(high=1)


def test_registry_builds_multiturn_envs():
    assert isinstance(make_env(name="guess", high=7), GuessEnv)
    assert isinstance(make_env(name="calculator"), CalculatorEnv)
