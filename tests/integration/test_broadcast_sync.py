"""weight_sync.method=broadcast on a real local Ray: the actor broadcasts bucketed full weights to two
rollout replicas over a gloo group (NCCL on GPUs, same code) every step, instead of the object store."""

import json

import pytest

from relaxrl.train import run_experiment
from tests.integration.helpers import make_cfg

pytestmark = pytest.mark.ray


def test_broadcast_sync_keeps_rollouts_on_the_newest_weights(ray_local, tmp_path, model_cache):
    cfg = make_cfg(tmp_path, model_cache, "weight_sync.method=broadcast", "weight_sync.bucket_mb=0.25",
                   "rollout.max_staleness=0", "trainer.steps=4", "rollout.groups_per_step=2",
                   "rollout.num_replicas=2", "rollout.num_cpus=0.3", "trainer.num_cpus=0.5")
    s = run_experiment(cfg)
    assert s["steps"] == 4 and s["staleness_hist"] == {0: 4 * 2 * 8}
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "step" in m]
    # Every step trains on samples generated with the weights just broadcast: on the same weights
    # the behaviour log-probs equal the trainer's, so the importance weights are exactly 1.
    for m in steps:
        assert abs(m["approx_kl_behaviour"]) < 1e-5 and abs(m["is_weight_mean"] - 1) < 1e-5, m
    assert all(m["publish_bytes"] > 1e6 for m in steps)  # the full fp32 state (~1.2 MB), untied
    assert s["weights_kind"] is None  # nothing went through the object store
    print(f"broadcast sync: {steps[-1]['publish_bytes']} bytes/version, publish {steps[-1]['publish_s'] * 1000:.1f} ms")


def test_broadcast_sync_rejects_lora(tmp_path, model_cache):
    from relaxrl.services.broadcast_sync import sync_settings

    cfg = make_cfg(tmp_path, model_cache, "weight_sync.method=broadcast", "model.lora.enabled=true")
    with pytest.raises(ValueError, match="full weights"):
        sync_settings(cfg, "x")
    with pytest.raises(ValueError, match="weight_sync.method must be one of"):
        sync_settings(make_cfg(tmp_path, model_cache, "weight_sync.method=nccl"), "x")

