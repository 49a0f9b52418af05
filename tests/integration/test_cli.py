"""The command a user types: a Hydra multirun over two learning rates with W&B offline."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]


def test_multirun_two_learning_rates_with_wandb_offline(tmp_path, model_cache):
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    cmd = [
        sys.executable, "-m", "relaxrl.train", "-m", "+experiment=quickstart",
        "trainer.lr=1e-4,5e-4", "trainer.steps=3", "rollout.max_staleness=0", "rollout.groups_per_step=2",
        "model.warm_start.steps=100", f"model.cache_dir={model_cache}", "logger=wandb",
        "logger.progress=false", "trainer.save_final=false", "ray.num_cpus=2",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert len(re.findall(r"^relaxrl summary: steps=3 ", proc.stdout, flags=re.M)) == 2
    for job, lr in (("0", 1e-4), ("1", 5e-4)):
        run_dir = tmp_path / job
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "step" in r] == [1, 2, 3]
        assert all(abs(r["lr"] - lr) < 1e-12 for r in rows if "step" in r)
        offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
        assert offline_runs, f"no W&B offline run directory in {run_dir}"
        assert any(p.suffix == ".wandb" for p in offline_runs[0].iterdir())
