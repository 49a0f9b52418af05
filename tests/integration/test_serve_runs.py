"""Real Serve runs on a local Ray (no mocks): sync and async modes, LoRA, KL through the teacher."""

import json

import pytest

from relaxrl.train import run_experiment
from tests.integration.helpers import make_cfg

pytestmark = pytest.mark.ray


def read_metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x], [x["summary"] for x in lines if "summary" in x]


def test_sync_mode_trains_every_sample_on_policy(ray_local, tmp_path, model_cache):
    cfg = make_cfg(tmp_path, model_cache, "rollout.max_staleness=0", "trainer.steps=4",
                   "rollout.groups_per_step=2", "trainer.save_final=true")
    s = run_experiment(cfg)
    assert s["steps"] == 4
    assert s["staleness_hist"] == {0: 4 * 2 * 8}  # every trained sample had staleness 0
    assert s["max_staleness_seen"] == 0 and s["dropped"] == 0
    steps, summaries = read_metrics(tmp_path)
    assert [m["version"] for m in steps] == [1, 2, 3, 4]
    assert all(m["staleness_max"] == 0 for m in steps)
    assert summaries and summaries[0]["steps"] == 4
    assert s["weights_kind"] == "full"
    assert (tmp_path / "checkpoints" / "final" / "trainer_state.pt").is_file()
    assert (tmp_path / "resolved_config.yaml").is_file()


def test_async_mode_overlaps_generation_and_training(ray_local, tmp_path, model_cache):
    cfg = make_cfg(tmp_path, model_cache, "rollout.max_staleness=2", "trainer.steps=12")
    s = run_experiment(cfg)
    assert s["steps"] == 12
    assert 1 <= s["max_staleness_seen"] <= 2
    assert max(s["staleness_hist"]) <= 2
    assert sum(s["staleness_hist"].values()) == 12 * 8 * 8
    # Generation ran while the trainer was busy: the two busy periods intersect in wall time.
    assert s["overlap_frac"] > 0.0
    print(f"overlap_frac={s['overlap_frac']:.3f} gen={s['gen_busy_frac']:.3f} train={s['train_busy_frac']:.3f}")


def test_lora_run_publishes_only_the_adapter(ray_local, tmp_path, model_cache):
    from safetensors.torch import load_file

    from relaxrl.launch import prepare_model_dir

    cfg = make_cfg(tmp_path, model_cache, "trainer.steps=2", "rollout.max_staleness=0",
                   "model.lora.enabled=true", "model.lora.r=4")
    s_lora = run_experiment(cfg)
    assert s_lora["steps"] == 2 and s_lora["weights_kind"] == "lora"
    # What a full run publishes: every weight of the model, in fp32 (the trainer's master weights).
    weights = load_file(f"{prepare_model_dir(cfg)}/model.safetensors")
    full_nbytes = sum(t.numel() * 4 for t in weights.values())
    assert s_lora["weights_nbytes"] < 0.1 * full_nbytes
    print(f"lora bytes={s_lora['weights_nbytes']} full bytes={full_nbytes}")


def test_kl_to_reference_goes_through_the_teacher_role(ray_local, tmp_path, model_cache):
    """At rollout.temperature=0.7 the teacher role scores the reference at the trainer's temperature:
    the first step's policy is the reference itself, so its KL is 0 (0.009 with the teacher at T=1,
    before), and it grows as soon as training has moved the policy."""
    cfg = make_cfg(tmp_path, model_cache, "trainer.steps=3", "algorithm.kl_coef=0.05",
                   "rollout.max_staleness=1", "rollout.temperature=0.7")
    s = run_experiment(cfg)
    steps, _ = read_metrics(tmp_path)
    assert s["steps"] == 3
    kls = [m["kl"] for m in steps]
    print(f"kl per step: {kls}")
    assert kls[0] < 1e-6
    assert kls[2] > 1e-3  # 0.096 measured; 0 would mean the reference moved with the policy


def test_trainer_cpus_pin_the_trainer_and_keep_the_other_roles_off(ray_local, tmp_path, model_cache):
    """trainer.cpus=[0]: the trainer replica runs on CPU 0 only; the rollout, the reward, the queue
    and the driver (for the run's length) on the others."""
    import os

    import ray

    from relaxrl.faults import replica_actors

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux CPU affinity and 2 CPUs")
    before = os.sched_getaffinity(0)
    others = before - {0}
    seen = {}

    def affinity(handle):
        return ray.get(handle.__ray_call__.remote(lambda self: os.sched_getaffinity(0)))

    async def look(roles, step, metrics):
        if step == 1:
            for role in ("actor", "rollout", "reward"):
                (replica,) = replica_actors(f"{role}-{roles.run_id}")
                seen[role] = affinity(replica)
            seen["queue"] = affinity(roles.queue)
            seen["driver"] = os.sched_getaffinity(0)
        return {}

    run_experiment(make_cfg(tmp_path, model_cache, "trainer.steps=2", "trainer.cpus=[0]"), on_step=look)
    assert seen["actor"] == {0}
    assert seen["rollout"] == seen["reward"] == seen["queue"] == seen["driver"] == others
    assert os.sched_getaffinity(0) == before  # the driver's own affinity is given back after the run
    missing = max(before) + 1
    with pytest.raises(ValueError, match=rf"trainer.cpus=\[{missing}\] must be a proper subset"):
        run_experiment(make_cfg(tmp_path / "bad", model_cache, f"trainer.cpus=[{missing}]"))


def test_a_producer_error_outside_the_role_calls_ends_the_run_with_its_cause(ray_local, tmp_path, model_cache,
                                                                            monkeypatch):
    """An error while building a request (here: the task stream) used to kill its produce loop
    silently, and the trainer waited trainer.get_batch_timeout_s for a batch that never came."""
    import time

    from relaxrl import driver

    get = driver.TaskStream.get

    def get_or_fail(self, k):
        if k >= 20:  # the first steps run, then the stream breaks
            raise LookupError(f"task {k} is missing from the stream")
        return get(self, k)

    monkeypatch.setattr(driver.TaskStream, "get", get_or_fail)
    cfg = make_cfg(tmp_path, model_cache, "trainer.steps=50", "rollout.max_staleness=1")
    start = time.monotonic()
    with pytest.raises(driver.ProducerFailed, match="LookupError: task 2[0-9] is missing from the stream"):
        run_experiment(cfg)
    assert time.monotonic() - start < cfg.trainer.get_batch_timeout_s / 2
