"""Each benchmark's smoke version runs through the real code paths, so the benches never rot, and
its figures must lie in the ranges of ``smoke_checks`` (tested on recorded outputs in
``test_smoke_checks.py``)."""

import pytest
from smoke_checks import (check_async_speedup, check_critical_path, check_dagger_vs_bc, check_overhead,
                          check_queue_scale, check_role_hops, check_wire_format)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def output(capsys) -> str:
    """The bench's output, also shown on the real stdout (with -s): what the ranges come from."""
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)
    return out


def test_async_speedup_smoke(ray_local, model_cache, capsys):
    import async_speedup

    async_speedup.main([f"model.cache_dir={model_cache}", "--smoke", "--latency-ms", "20", "--staleness", "0", "2"])
    out = output(capsys)
    assert "simulated verifier latency: 20.0 ms per request (given)" in out
    assert "sample_efficiency:" in out
    check_async_speedup(out, latency_ms=20.0)


def test_overhead_smoke(ray_local, model_cache, capsys):
    import overhead

    overhead.main(["--smoke", "rollout.group_size=4", "rollout.groups_per_step=2", f"model.cache_dir={model_cache}"])
    out = output(capsys)
    assert "model=quickstart: 8 samples/step, 4 steps x 1 repeats" in out
    check_overhead(out)


def test_queue_scale_smoke(ray_local, capsys):
    import queue_scale

    queue_scale.main(["--smoke"])  # checks the queue's accounting identity after every measurement
    check_queue_scale(output(capsys))


def test_critical_path_smoke(ray_local, model_cache, capsys):
    import critical_path

    critical_path.main(["--smoke", "rollout.group_size=4", "rollout.groups_per_step=2", f"model.cache_dir={model_cache}"])
    check_critical_path(output(capsys))


def test_wire_format_smoke(capsys):
    import wire_format

    wire_format.main(["--smoke"])
    check_wire_format(output(capsys))


def test_role_hops_smoke(ray_local, capsys):
    import role_hops

    role_hops.main(["--smoke"])
    out = output(capsys)
    assert "layout=one_loop:" in out
    check_role_hops(out)


def test_dagger_vs_bc_smoke(model_cache, capsys):
    import dagger_vs_bc

    dagger_vs_bc.main(["--smoke", "--cache-dir", str(model_cache)])
    check_dagger_vs_bc(output(capsys))  # the smoke run: label budget 24, 2 seeds, collections of 4 episodes
