"""bench/dagger_vs_bc.py's settings: the env overrides and the per-seed label-fit line."""

import argparse

import dagger_vs_bc
import pytest


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"env": "gridwalk", "max_turns": 0, "env_set": [], **kw})


def test_the_bench_env_is_the_no_slip_gridwalk_and_env_set_overrides_by_key_with_yaml_types():
    assert dagger_vs_bc.env_config(args())["slip"] == 0.0  # the student's own mistakes are the only drift
    env = dagger_vs_bc.env_config(args(max_turns=9, env_set=["slip=0.3", "obs=offset", "size=10"]))
    assert (env["slip"], env["obs"], env["size"], env["max_turns"]) == (0.3, "offset", 10, 9)
    with pytest.raises(SystemExit, match="slipp"):
        dagger_vs_bc.env_config(args(env_set=["slipp=0.3"]))
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        dagger_vs_bc.env_config(args(env_set=["slip"]))


def test_dagger_holds_beta_1_for_hold_iters_and_bc_never_decays():
    a = argparse.Namespace(episodes_per_iter=16, steps_per_iter=20, batch_size=32, eval_episodes=8, eval_every=4,
                           buffer_size=4096, decay_iters=4, hold_iters=8, labels=1600, grpo_group=8)
    dagger, bc = dagger_vs_bc.method_config("dagger", a), dagger_vs_bc.method_config("bc", a)
    assert [dagger.beta(i) for i in (0, 7, 8, 9, 12)] == pytest.approx([1, 1, 1, 0.75, 0])
    assert [bc.beta(i) for i in (0, 12, 30)] == [1, 1, 1] and dagger.label_budget == bc.label_budget == 1600
