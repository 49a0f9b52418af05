"""Multi-turn runs through the one runtime (driver, staleness-bounded queue, episode rollout role)
on a real local Ray: DAgger with a checkpoint teacher through the teacher role, and GRPO on episodes."""

import json
import os

import pytest
from hydra import compose, initialize_config_module

from relaxrl import launch
from relaxrl.train import run_experiment

pytestmark = pytest.mark.ray


def episode_cfg(run_dir, cache_dir, *overrides, dagger=True):
    base = (["+experiment=dagger_toy", "algorithm.steps_per_iter=2", "algorithm.eval_episodes=8",
             "algorithm.label_budget=0", "algorithm.eval_every=1"] if dagger else
            ["env=calculator", "algorithm=grpo", "rollout.temperature=1.0"])
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(config_name="config", overrides=[
            *base, f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", "logger.progress=false",
            "trainer.save_final=false", "trainer.steps=4", "rollout.groups_per_step=4", "rollout.max_staleness=2",
            *overrides,
        ])


def check_queue_bound_and_accounting(summary, steps, groups, group_size=1):
    acc = summary["accounting"]
    assert acc["trained_samples"] == steps * groups * group_size == summary["episodes"]
    assert acc["admitted_samples"] == acc["trained_samples"] + acc["dropped_samples"] + acc["in_flight_samples"]
    assert sum(summary["staleness_hist"].values()) == steps * groups * group_size
    assert max(summary["staleness_hist"]) <= 2 and summary["max_staleness_seen"] <= 2


def test_dagger_toy_through_the_queue_with_a_checkpoint_teacher(ray_local, model_cache, tmp_path):
    from ray import serve

    model_dir = launch.prepare_model_dir(episode_cfg(tmp_path / "probe", model_cache))
    cfg = episode_cfg(tmp_path / "run", model_cache, "algorithm.teacher=checkpoint",
                      f"algorithm.teacher_checkpoint={model_dir}", "trainer.checkpoint_every=2")
    summary = run_experiment(cfg)
    print("dagger:", {k: summary[k] for k in ("staleness_hist", "accounting", "labels", "curve", "wall_s")})
    assert summary["steps"] == 4
    check_queue_bound_and_accounting(summary, 4, 4)
    # The teacher role labels every visited state (1-4 per episode), aggregated in the actor.
    assert 16 <= summary["labels"] <= 64
    assert [p["step"] for p in summary["curve"]] == [0, 2, 4]  # held-out: start, each collection period, end
    lines = [json.loads(x) for x in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    steps = [x for x in lines if "step" in x and "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all(x["teacher_token_logprob"] < 0 for x in steps)
    assert [x["algo/labels"] for x in steps] == sorted(x["algo/labels"] for x in steps)  # the buffer only grows
    # Each step trained the queue's episode groups once: the audit log lists every group's sample.
    trained = [u for x in map(json.loads, open(os.path.join(summary["run_dir"], "train_log.jsonl")))
               for u, _ in x["samples"]]
    assert len(trained) == len(set(trained)) == 16
    # Concurrent episodes share generate calls: serve.batch merged actions of different episodes.
    assert summary["student_actions"] > 2 * summary["generate_calls"] > 0
    assert not any(name.startswith(("rollout-", "teacher-")) for name in serve.status().applications)
    # The checkpoint (accounting checked when written) holds the aggregated labels of its step.
    state = json.load(open(os.path.join(summary["checkpoint"], "actor_state.json")))
    assert state["algorithm"]["labels"] == summary["labels"] == len(state["algorithm"]["buffer"])


def test_grpo_on_multi_turn_episodes_through_the_queue(ray_local, model_cache, tmp_path):
    cfg = episode_cfg(tmp_path / "grpo", model_cache, "rollout.group_size=4", "trainer.steps=3",
                      "rollout.groups_per_step=2", dagger=False)
    summary = run_experiment(cfg)
    print("grpo:", {k: summary[k] for k in ("staleness_hist", "accounting", "reward_first", "reward_last", "wall_s")})
    assert summary["steps"] == 3
    check_queue_bound_and_accounting(summary, 3, 2, group_size=4)
    assert summary["labels"] == 0 and summary["success"] is None  # no teacher; trainer.eval_every=0: no eval
