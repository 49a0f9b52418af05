import itertools

import pytest

from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.envs.base import Task
from relaxrl.envs.registry import make_env


def take(it, n):
    return list(itertools.islice(it, n))


def test_tasks_are_correct_and_in_range():
    env = ArithmeticEnv(ops=("+", "-", "*"), min_operand=2, max_operand=12)
    tasks = take(env.tasks("train", seed=0), 300)
    assert {t.meta["op"] for t in tasks} == {"+", "-", "*"}
    for t in tasks:
        a, b, op = t.meta["a"], t.meta["b"], t.meta["op"]
        assert 2 <= a <= 12 and 2 <= b <= 12
        assert t.prompt == f"{a}{op}{b}="
        assert int(t.answer) == eval(f"{a}{op}{b}") >= 0
        assert t.domain == "arithmetic"
    assert [t.task_id for t in tasks[:3]] == ["train-0", "train-1", "train-2"]


def test_streams_are_deterministic_and_seeded():
    env = ArithmeticEnv(max_operand=99)
    a, b = take(env.tasks("train", 1), 50), take(env.tasks("train", 1), 50)
    assert [(t.prompt, t.answer) for t in a] == [(t.prompt, t.answer) for t in b]
    assert [t.prompt for t in a] != [t.prompt for t in take(env.tasks("train", 2), 50)]
    ev = list(env.tasks("eval", 1))
    assert len(ev) == 64 and ev[-1].task_id == "eval-63"
    assert [t.prompt for t in ev] != [t.prompt for t in a + a[:14]]  # a different stream from train
    assert [t.prompt for t in ev] == [t.prompt for t in env.tasks("eval", 1)]
    assert ArithmeticEnv().sft_pairs(5, 0) == ArithmeticEnv().sft_pairs(5, 0)
    assert all(str(eval(p[:-1])) == a for p, a in ArithmeticEnv(ops="+-*").sft_pairs(50, 3))


def test_train_stream_is_endless():
    assert len(take(ArithmeticEnv(eval_size=3).tasks("train", 0), 1000)) == 1000


def test_verify_exact_after_strip():
    env = ArithmeticEnv()
    task = Task(task_id="t", prompt="3+4=", answer="7")
    assert env.verify("7", task) == 1.0
    assert env.verify(" 7\n", task) == 1.0
    assert env.verify("77", task) == 0.0
    assert env.verify("7.0", task) == 0.0
    assert env.verify("", task) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"ops": ()}, "empty"), ({"ops": ("+", "/")}, "'/'"), ({"min_operand": 5, "max_operand": 3}, "min_operand=5"),
     ({"eval_size": 0}, "eval_size")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticEnv(**kwargs)


def test_bad_split():
    with pytest.raises(ValueError, match="'test'"):
        next(ArithmeticEnv().tasks("test", 0))


def test_registry():
    env = make_env("arithmetic", ops=["-"], eval_size=5)
    assert isinstance(env, ArithmeticEnv) and env.ops == ("-",) and len(list(env.tasks("eval", 0))) == 5
    with pytest.raises(ValueError, match="arithmetic.*dataset"):
        make_env("chess")
    with pytest.raises(TypeError, match="bogus"):
        make_env("arithmetic", bogus=1)
