"""Each benchmark's smoke version runs through the real code paths, so the benches never rot."""

import re

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def last_line(out: str, name: str) -> dict[str, float]:
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"{name}: "), line
    return {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.]+)", line)}


def test_async_speedup_smoke(ray_local, model_cache, capsys):
    import async_speedup

    async_speedup.main([f"model.cache_dir={model_cache}", "--smoke", "--latency-ms", "20", "--staleness", "0", "2"])
    out = capsys.readouterr().out
    assert "simulated verifier latency: 20.0 ms per request (given)" in out
    v = last_line(out, "async_speedup")
    assert v["sync_steps_per_h"] > 0 and v["async_steps_per_h"] > 0
    assert v["limit"] >= 1.0 and v["ratio"] == pytest.approx(v["async_steps_per_h"] / v["sync_steps_per_h"], rel=1e-2)
    assert "max_staleness=2:" in out and "sample_efficiency:" in out


def test_overhead_smoke(ray_local, model_cache, capsys):
    import overhead

    overhead.main(["--smoke", "rollout.group_size=4", "rollout.groups_per_step=2", f"model.cache_dir={model_cache}"])
    v = last_line(capsys.readouterr().out, "overhead")
    assert v["bare_samples_per_s"] > 0 and v["relaxrl_samples_per_s"] > 0
    assert v["ratio"] == pytest.approx(v["relaxrl_samples_per_s"] / v["bare_samples_per_s"], rel=1e-2)


def test_queue_scale_smoke(ray_local, capsys):
    import queue_scale

    queue_scale.main(["--smoke"])  # checks the queue's accounting identity after every measurement
    out = capsys.readouterr().out
    v = last_line(out, "queue_scale")
    assert v["samples_per_s"] > 0 and v["p99_ms"] > 0 and v["producers"] == 4 and v["groups_per_request"] == 8
    assert re.search(r"tokens=64: [\d.]+ KiB per queued sample", out)


def test_critical_path_smoke(ray_local, model_cache, capsys):
    import critical_path

    critical_path.main(["--smoke", "rollout.group_size=4", "rollout.groups_per_step=2", f"model.cache_dir={model_cache}"])
    v = last_line(capsys.readouterr().out, "critical_path")
    assert v["train_ms"] > 0 and v["generate_ms"] > 0 and v["handoff_ms"] > 0
    assert v["step_ms"] >= v["train_ms"] + v["generate_ms"]


def test_wire_format_smoke(capsys):
    import wire_format

    wire_format.main(["--smoke"])
    v = last_line(capsys.readouterr().out, "wire_format")
    assert v["samples"] == 32 and v["before_ms"] > 0 and v["now_ms"] > 0
    assert v["bytes_ratio"] < 1.0  # shared timings and prompts are pickled once


def test_role_hops_smoke(ray_local, capsys):
    import role_hops

    role_hops.main(["--smoke"])
    out = capsys.readouterr().out
    v = last_line(out, "role_hops")
    assert all(v[f"{h}_ms"] > 0 for h in role_hops.HOPS) and v["samples"] == 32
    assert v["path_floor_ms"] == pytest.approx(role_hops.path_floor({h: v[f"{h}_ms"] for h in role_hops.HOPS}), abs=0.2)
    assert "layout=one_loop:" in out and v["one_loop_serve_ratio"] > 0


def test_dagger_vs_bc_smoke(model_cache, capsys):
    import dagger_vs_bc

    dagger_vs_bc.main(["--smoke", "--cache-dir", str(model_cache)])
    out = capsys.readouterr().out
    v = last_line(out, "dagger_vs_bc")
    assert all(0.0 <= v[f"{m}_success"] <= 1.0 for m in ("dagger", "bc", "grpo"))
    assert 0 < v["labels"] <= 24  # the smoke run's label budget
    assert "curve dagger:" in out and "curve grpo:" in out
