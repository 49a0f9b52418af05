"""The smoke benches' checks pass on what a smoke run printed, and fail on the regressions they
name (no bench is run here: milliseconds)."""

import os
import re

import pytest
from smoke_checks import (check_async_speedup, check_critical_path, check_dagger_vs_bc, check_overhead,
                          check_queue_scale, check_role_hops, check_wire_format)


def recorded() -> dict[str, str]:
    with open(os.path.join(os.path.dirname(__file__), "recorded_smoke.txt")) as f:
        text = f.read()
    return {m.group(1): m.group(2) for m in re.finditer(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.S | re.M)}


OUT = recorded()
CHECKS = {
    "async_speedup": lambda out: check_async_speedup(out, latency_ms=20.0),
    "overhead": check_overhead,
    "overhead_noisy": check_overhead,  # another run, its bare loop slowed by the busy machine: ratio 1.33
    "queue_scale": check_queue_scale,
    "critical_path": check_critical_path,
    "wire_format": check_wire_format,
    "role_hops": check_role_hops,
    "dagger_vs_bc": check_dagger_vs_bc,
}


@pytest.mark.parametrize("bench", sorted(CHECKS))
def test_a_recorded_smoke_run_passes(bench):
    CHECKS[bench](OUT[bench])


def edit(bench: str, old: str, new: str) -> str:
    assert old in OUT[bench], old
    return OUT[bench].replace(old, new)


REGRESSIONS = [
    # The simulated verifier latency not applied: the reward stage takes ~2 ms per step.
    ("async_speedup", "gen=78.940 reward=29.172", "gen=78.940 reward=2.100"),
    # The "asynchronous" run trained every sample on-policy: nothing overlapped.
    ("async_speedup", "staleness_hist={0: 256, 1: 256, 2: 512} dropped=0", "staleness_hist={0: 1024} dropped=0"),
    # A stage counted twice in the overlap limit.
    ("async_speedup", "limit=1.876 efficiency", "limit=3.752 efficiency"),
    # RelaxRL measured three times as fast as the bare loop doing the same work: not the same work.
    ("overhead", "relaxrl_samples_per_s=79.8 ratio=0.482", "relaxrl_samples_per_s=496.2 ratio=3.000"),
    # The framework slowed sevenfold (e.g. a hop that waits on a timeout).
    ("overhead", "relaxrl_samples_per_s=79.8 ratio=0.482", "relaxrl_samples_per_s=20.0 ratio=0.121"),
    # The two loops trained different batches (five times the samples).
    ("overhead", "train=23.4/26.7", "train=23.4/240.0"),
    # A group's samples no longer share their prompt (2.5 KiB, as before they did).
    ("queue_scale", "tokens=64: 2.2 KiB", "tokens=64: 2.5 KiB"),
    # A put per group again: 8 groups per request no faster than 1.
    ("queue_scale", "groups_per_request=8 samples_per_s=4761", "groups_per_request=8 samples_per_s=1200"),
    # A step cut at the wrong intervals: a negative hop.
    ("critical_path", "to_trainer_ms=5.8", "to_trainer_ms=-40.2"),
    # A hand-off that waits a timeout out (hundreds of ms per step).
    ("critical_path", "step_ms=64.9 handoff_ms=25.9", "step_ms=564.9 handoff_ms=525.9"),
    # Samples pickled one by one again (each its own prompt and timings).
    ("wire_format", "bytes_ratio=0.570", "bytes_ratio=1.000"),
    # Shared, but no longer column-wise (Packed lost): 8,195 of 11,803 bytes.
    ("wire_format", "bytes_ratio=0.570", "bytes_ratio=0.694"),
    # A hop that is not what it says (a Serve hop of 0.0 ms: nothing was sent).
    ("role_hops", "serve_hop_ms=4.35 weights_hop_ms=7.01 path_floor_ms=17.7 one_loop",
     "serve_hop_ms=0.00 weights_hop_ms=7.01 path_floor_ms=17.7 one_loop"),
    # BC given a different label budget than DAgger.
    ("dagger_vs_bc", "bc          0      24", "bc          0      12"),
    # Outcome-only GRPO collected teacher labels.
    ("dagger_vs_bc", "grpo        0       0", "grpo        0      24"),
    # Labels counted down along a curve.
    ("dagger_vs_bc", "curve bc seed 0: 18:0.00/0.00 24:0.00/0.25", "curve bc seed 0: 24:0.00/0.00 18:0.00/0.25"),
    # The summary line ignores a seed (seed 1's DAgger success is not in its median).
    ("dagger_vs_bc", "dagger      1      24        4    0.000", "dagger      1      24        4    0.500"),
    # A seed lost from the summary's count.
    ("dagger_vs_bc", "labels=24 seeds=2", "labels=24 seeds=1"),
]


@pytest.mark.parametrize("bench, old, new", REGRESSIONS, ids=[f"{b}-{i}" for i, (b, _, _) in enumerate(REGRESSIONS)])
def test_a_regression_fails_its_smoke_check(bench, old, new):
    with pytest.raises(AssertionError):
        CHECKS[bench](edit(bench, old, new))
