"""The MOPD stage pipeline, fast: one command runs GRPO add -> GRPO sub -> MOPD and stores the registry;
a rerun from the MOPD stage reuses the completed stages."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from relaxrl.pipeline.registry import CheckpointRegistry
from relaxrl.pipeline.runner import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

FAST = [
    "+experiment=mopd_toy", "logger.progress=false", "model.warm_start.steps=50",
    "rollout.group_size=4", "rollout.groups_per_step=2",
    "pipeline.stages.0.steps=1", "pipeline.stages.0.eval_every=1",
    "pipeline.stages.1.steps=1", "pipeline.stages.1.eval_every=1",
    "pipeline.stages.2.steps=2", "pipeline.stages.2.eval_every=1",
    "trainer.eval_max_tasks=32",  # per domain's share of the eval split: what is tested is the bookkeeping
]


def read_jsonl(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_one_command_runs_the_stages_and_stores_the_registry_then_resumes(ray_local, tmp_path, model_cache):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "relaxrl.train", *FAST, f"run_dir={run_dir}", f"model.cache_dir={model_cache}",
           "ray.num_cpus=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "relaxrl pipeline: stages=grpo_add,grpo_sub,mopd" in proc.stdout

    # Registry: the best checkpoint of each GRPO stage is its domain's teacher, loadable on its own.
    reg = CheckpointRegistry(str(run_dir / "registry.json"))
    add, sub = reg.get("add"), reg.get("sub")
    assert (add.stage, sub.stage) == ("grpo_add", "grpo_sub")
    for entry in (add, sub):
        assert os.path.isfile(os.path.join(entry.path, "config.json"))
        assert os.path.isfile(os.path.join(entry.path, "tokenizer.json"))
    # The teacher's score is the best evaluation of its domain in its stage.
    evals = {s: read_jsonl(run_dir / s / "eval.jsonl") for s in ("grpo_add", "grpo_sub", "mopd")}
    assert add.score == max(r["domains"]["add"]["accuracy"] for r in evals["grpo_add"])
    assert sub.score == max(r["domains"]["sub"]["accuracy"] for r in evals["grpo_sub"])
    assert [r["step"] for r in evals["mopd"]] == [0, 1, 2]
    assert all(set(r["domains"]) == {"add", "sub"} for rows in evals.values() for r in rows)

    # Each stage starts from the previous stage's final checkpoint; MOPD is served both teachers.
    state = json.loads((run_dir / "pipeline_state.json").read_text())["stages"]
    assert state["grpo_sub"]["init"] == state["grpo_add"]["final"]
    assert state["mopd"]["init"] == state["grpo_sub"]["final"]
    mopd_cfg = (run_dir / "mopd" / "resolved_config.yaml").read_text()
    assert add.path in mopd_cfg and sub.path in mopd_cfg and "name: mopd" in mopd_cfg
    steps = [r for r in read_jsonl(run_dir / "mopd" / "metrics.jsonl") if "step" in r]
    assert len(steps) == 2 and all("teacher_kl" in r and "eval/add/accuracy" in r for r in steps)
    assert all(0.5 <= r["is_weight_mean"] <= 2.0 for r in steps)

    # Resume at the MOPD stage: the GRPO stages are reused, not rerun.
    add_metrics = (run_dir / "grpo_add" / "metrics.jsonl").read_text()
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[*FAST, f"run_dir={run_dir}", f"model.cache_dir={model_cache}",
                                                       "pipeline.start_at=mopd"])
    result = run_pipeline(cfg)
    assert (run_dir / "grpo_add" / "metrics.jsonl").read_text() == add_metrics
    assert len(read_jsonl(run_dir / "mopd" / "eval.jsonl")) == 6  # appended by the rerun
    assert result["teachers"] == {"add": add.score, "sub": sub.score}
