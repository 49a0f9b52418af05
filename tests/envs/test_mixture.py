"""The mixture env: one domain per part, round-robin training stream, per-part eval and verification."""

import itertools

import pytest

from relaxrl.envs.base import Task
from relaxrl.envs.registry import make_env

PARTS = [{"name": "arithmetic", "ops": ["+"], "domain": "add", "eval_size": 5},
         {"name": "arithmetic", "ops": ["-"], "domain": "sub", "eval_size": 3}]


def test_train_stream_alternates_domains_and_eval_covers_every_part():
    env = make_env("mixture", parts=PARTS)
    train = list(itertools.islice(env.tasks("train", 0), 6))
    assert [t.domain for t in train] == ["add", "sub"] * 3
    assert all(("+" in t.prompt) == (t.domain == "add") for t in train)
    evals = list(env.tasks("eval", 0))
    assert [t.domain for t in evals] == ["add", "sub"] * 3 + ["add"] * 2
    assert len({t.task_id for t in evals}) == 8


def test_verify_uses_the_part_of_the_task_domain():
    env = make_env("mixture", parts=PARTS)
    add = next(t for t in env.tasks("train", 0) if t.domain == "add")
    assert env.verify(add.answer, add) == 1.0
    with pytest.raises(ValueError, match="not a part"):
        env.verify("1", Task("x", "1+0=", "1", domain="mul"))


def test_sft_pairs_mix_the_parts_and_bad_configs_are_named():
    env = make_env("mixture", parts=PARTS)
    pairs = env.sft_pairs(10, seed=0)
    assert len(pairs) == 10 and sum("+" in p for p, _ in pairs) == 5
    with pytest.raises(ValueError, match="distinct domains"):
        make_env("mixture", parts=[PARTS[0], PARTS[0]])
    with pytest.raises(ValueError, match="at least one part"):
        make_env("mixture", parts=[])


def test_a_prefix_of_the_eval_split_scores_every_domain():
    """trainer.eval_max_tasks takes a prefix of the eval split: with the domains one after the other,
    a prefix of 32 was all `add` and the held-out/stage evaluation never saw `sub`."""
    import itertools

    env = make_env(name="mixture", parts=[
        {"name": "arithmetic", "ops": ["+"], "max_operand": 5, "domain": "add", "eval_size": 10},
        {"name": "arithmetic", "ops": ["-"], "max_operand": 5, "domain": "sub", "eval_size": 3},
    ])
    first = [t.domain for t in itertools.islice(env.tasks("eval", 0), 4)]
    assert first == ["add", "sub", "add", "sub"]
    every = [t.domain for t in env.tasks("eval", 0)]
    assert every.count("add") == 10 and every.count("sub") == 3  # nothing lost once a domain runs out
    assert len({t.task_id for t in env.tasks("eval", 0)}) == 13
