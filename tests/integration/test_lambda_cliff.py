"""The λ* bench's fast version end to end (pre-registration, fixed-λ sweep, scheduler, report line),
and the scheduler on the real framework: teacher role scoring teacher and base, per-step logging
of p, b, c, λ*, λ and parse validity to metrics.jsonl."""

import json
import math
import re

import pytest

from relaxrl.train import run_experiment

# Smaller warm starts than the bench's, so the test builds its models quickly.
FAST = ["model.warm_start.steps=40", "teacher.teacher_warm_start.steps=40", "rollout.groups_per_step=2"]


def _rows(path):
    return [r for r in (json.loads(x) for x in path.read_text().splitlines()) if "step" in r]


def test_fast_lambda_cliff_bench(tmp_path, model_cache, capsys):
    from bench.lambda_cliff import main

    report = main(["--fast", "--steps", "3", "--tail", "1.0", "--out", str(tmp_path),
                   f"model.cache_dir={model_cache}", *FAST])
    out = capsys.readouterr().out
    assert out.index("pre-registered:") < out.index("lambda=1.0")  # predicted before any run
    last = out.strip().splitlines()[-1]
    m = re.match(r"lambda_cliff: predicted=(\S+) observed_lo=(\S+) observed_hi=(\S+) scheduler_validity=(\S+) "
                 r"baseline_validity=(\S+) scheduler_accuracy=(\S+) baseline_accuracy=(\S+) inside=(yes|no) c=2 "
                 r"cross_c=4 cross_predicted=(\S+) cross_observed_lo=\S+ cross_observed_hi=\S+ cross_inside=(yes|no) "
                 r"clip_reference=base$", last)
    assert m, last
    assert float(m.group(1)) == pytest.approx(report["predicted"], abs=1e-3)
    assert float(m.group(9)) == pytest.approx(report["cross"]["predicted"], abs=1e-3)
    assert out.index("pre-registered: c=4") < out.index("c=2 lambda=1.0")  # both locked before any run
    assert json.loads((tmp_path / "prereg.json").read_text())["grids"] == {"2.0": [1.0, 3.0], "4.0": [1.0, 3.0]}
    pre = report["prereg"]
    assert 0 < pre["p"] < 1 and 0 < pre["b"] < 1 and pre["structural_positions"] > 0
    assert set(report["results"]) == {"1.0", "3.0"}
    for r in [*report["results"].values(), report["scheduler"]]:
        assert 0.0 <= r["validity"] <= 1.0
    for r in _rows(tmp_path / "c2" / "scheduler" / "metrics.jsonl"):  # λ_t = min(λ_target, (1 − ε) λ*_t)
        assert r["algo/lambda"] == pytest.approx(min(3.0, 0.9 * r["algo/lambda_star"]), rel=1e-6)
    assert all(r["algo/lambda"] == 3.0 for r in _rows(tmp_path / "c4" / "lam_3.0" / "metrics.jsonl"))


@pytest.mark.ray
def test_scheduler_on_the_framework_logs_every_step(ray_local, tmp_path, model_cache):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[
            "+experiment=lambda_cliff", *FAST, "trainer.steps=3", "algorithm.schedule=lambda_star",
            "algorithm.lam=4", "logger.progress=false", "trainer.save_final=false",
            f"run_dir={tmp_path}", f"model.cache_dir={model_cache}"])
    s = run_experiment(cfg)
    assert s["steps"] == 3 and s["dropped"] == 0
    rows = _rows(tmp_path / "metrics.jsonl")
    assert len(rows) == 3
    for r in rows:
        for key in ("algo/p", "algo/b", "algo/c", "algo/lambda_star", "algo/lambda", "info/valid", "info/correct"):
            assert key in r, key
        assert r["algo/structural_positions"] > 0 and math.isfinite(r["algo/lambda_star"])
        assert r["algo/lambda"] == pytest.approx(min(4.0, 0.9 * r["algo/lambda_star"]), rel=1e-6)
        assert r["kl_teacher"] != r["kl_base"]  # two different checkpoints were scored
    assert rows[0]["kl_base"] == pytest.approx(0.0, abs=1e-4)  # the first policy is the base itself
