"""Kill the trainer mid-run, resume from its checkpoint: the same parameters, metrics and training
order as a run that was never interrupted (max_staleness=0, fixed seeds)."""

import os

import pytest
import ray

from relaxrl.driver import TrainerLost
from relaxrl.train import run_experiment
from tests.integration.helpers import make_cfg
from tests.reliability.runs import app_replicas, final_params, in_thread, step_metrics, train_log, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.fault]

# Reproducible mode: synchronous, and one group per generate call so batching cannot change samples.
SYNC = ["rollout.max_staleness=0", "rollout.batch_max_groups=1", "rollout.group_size=4",
        "rollout.groups_per_step=2", "trainer.steps=6", "seed=3"]
def comparable(m: dict) -> dict:
    """A step's metrics without its timings (``*_start``, ``*_end``, ``*_s``, throughput)."""
    return {k: v for k, v in m.items() if k != "step" and not k.endswith(("_start", "_end", "_s"))}


def test_killed_and_resumed_run_equals_uninterrupted_run(ray_local, tmp_path, model_cache):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    s_whole = run_experiment(make_cfg(whole, model_cache, *SYNC, "trainer.save_final=true"))

    # Same run, checkpointing every 2 steps; its trainer replica is killed after the first one (and
    # not restored in the run: test_trainer_recovery.py does that).
    t, box = in_thread(run_experiment, make_cfg(broken, model_cache, *SYNC, "trainer.checkpoint_every=2",
                                                "faults.trainer_restarts=0"))
    wait_for(lambda: os.path.isfile(broken / "checkpoints" / "step_2" / "meta.json"), 120, "checkpoint", box)
    for replica in app_replicas("actor"):
        ray.kill(replica, no_restart=True)
    t.join(120)
    assert isinstance(box.get("error"), TrainerLost), box  # the run stops with a clear error
    assert "resume=true" in str(box["error"])

    s = run_experiment(make_cfg(broken, model_cache, *SYNC, "trainer.save_final=true", "resume=true"))
    assert s["steps"] == 6 and s["resumed_from"].startswith(str(broken / "checkpoints" / "step_"))
    a, b = final_params(whole), final_params(broken)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, diff

    # Identical metrics across the runs (every logged step, including the killed run's own) and the
    # same (uid, policy version) training order, each uid once.
    ref = {m["step"]: comparable(m) for m in step_metrics(whole)}
    assert [m["step"] for m in step_metrics(broken)] == list(range(1, 7))  # rows past the checkpoint: gone
    for m in step_metrics(broken):
        assert comparable(m) == ref[m["step"]], m["step"]
    assert train_log(whole) == train_log(broken)
    assert len(set(train_log(broken))) == len(train_log(broken)) == 6 * 2 * 4
    assert s["accounting"]["trained_samples"] == s_whole["accounting"]["trained_samples"] == 48
    print(f"resume: max |param diff| = {diff:.2e}; resumed from {os.path.basename(s['resumed_from'])}")
