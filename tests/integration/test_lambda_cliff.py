"""The λ* bench's fast version end to end on a real local Ray: pre-registration, a fixed-λ sweep,
the scheduler run, per-step logging of p, b, c, λ*, λ and parse validity, and the report line."""

import json
import math
import re

import pytest

pytestmark = pytest.mark.ray

FAST = ["model.warm_start.steps=60", "teacher.teacher_warm_start.steps=90", "rollout.groups_per_step=2",
        "rollout.max_staleness=0"]


def test_fast_lambda_cliff_bench(ray_local, tmp_path, model_cache, capsys):
    from bench.lambda_cliff import main

    report = main(["--fast", "--steps", "3", "--tail", "1.0", "--out", str(tmp_path),
                   f"model.cache_dir={model_cache}", *FAST])
    out = capsys.readouterr().out
    # the prediction is printed before the first training run
    assert out.index("pre-registered:") < out.index("lambda=1.0")
    last = out.strip().splitlines()[-1]
    m = re.match(r"lambda_cliff: predicted=(\S+) observed_lo=(\S+) observed_hi=(\S+) scheduler_validity=(\S+) "
                 r"baseline_validity=(\S+) scheduler_accuracy=(\S+) baseline_accuracy=(\S+)$", last)
    assert m, last
    assert float(m.group(1)) == pytest.approx(report["predicted"], abs=1e-3)
    pre = report["prereg"]
    assert 0 < pre["p"] < 1 and 0 < pre["b"] < 1 and pre["structural_positions"] > 0
    assert set(report["results"]) == {"1.0", "3.0"}
    for r in [*report["results"].values(), report["scheduler"]]:
        assert 0.0 <= r["validity"] <= 1.0

    # every step of every run logs p, b, c, λ*, λ and parse validity to metrics.jsonl
    sched_rows = [json.loads(x) for x in (tmp_path / "scheduler" / "metrics.jsonl").read_text().splitlines()]
    sched_rows = [r for r in sched_rows if "step" in r]
    assert len(sched_rows) == 3
    for r in sched_rows:
        for key in ("algo/p", "algo/b", "algo/c", "algo/lambda_star", "algo/lambda", "info/valid"):
            assert key in r, key
        # the schedule: λ_t = min(λ_target, (1 − ε) λ*_t), λ_target = the grid's top (3)
        assert r["algo/lambda"] == pytest.approx(min(3.0, 0.9 * r["algo/lambda_star"]), rel=1e-6)
    fixed = [json.loads(x) for x in (tmp_path / "lam_3.0" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["algo/lambda"] == 3.0 and math.isfinite(r["kl_base"]) for r in fixed if "step" in r)
