"""DAgger end to end on Serve (episode rollout, actor, teacher checkpoint) on a real local Ray."""

import json
import os

from hydra import compose, initialize_config_module

from relaxrl import launch
from relaxrl.train import run_experiment


def dagger_cfg(run_dir, cache_dir, *overrides):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(config_name="config", overrides=[
            "+experiment=dagger_toy", f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", "logger.progress=false",
            "trainer.save_final=false", "trainer.steps=4", "algorithm.steps_per_iter=2",
            "algorithm.episodes_per_iter=8", "algorithm.eval_episodes=8", "algorithm.label_budget=0",
            "algorithm.eval_every=1", *overrides,
        ])


def test_dagger_toy_runs_on_serve_with_a_checkpoint_teacher(ray_local, model_cache, tmp_path):
    from ray import serve

    model_dir = launch.prepare_model_dir(dagger_cfg(tmp_path / "probe", model_cache))
    cfg = dagger_cfg(tmp_path / "run", model_cache, "algorithm.teacher=checkpoint",
                     f"algorithm.teacher_checkpoint={model_dir}")
    summary = run_experiment(cfg)
    assert summary["steps"] == 4
    # Two collections of 8 episodes; the teacher labels every visited state (1-4 per episode).
    assert summary["episodes"] == 16 and 16 <= summary["labels"] <= 64
    assert [p["step"] for p in summary["curve"]] == [0, 2, 4]  # eval after each collection, and at the end
    assert all(0.0 <= p["success"] <= 1.0 for p in summary["curve"])
    lines = [json.loads(x) for x in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    steps = [x for x in lines if "step" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all(x["teacher_token_logprob"] < 0 and x["labels"] > 0 for x in steps)
    # Concurrent episodes share generate calls: serve.batch merged actions of different episodes.
    assert summary["student_actions"] > 2 * summary["generate_calls"] > 0
    assert not any(name.startswith(("episodes-", "teacher-")) for name in serve.status().applications)
