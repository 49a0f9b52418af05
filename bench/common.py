"""Shared pieces of the benchmarks: compose a run config as the CLI would, run it in-process,
read its per-step metrics back, and summarise curves. Every number printed comes from one run."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from typing import Any, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # as a run's own local Ray (ray.worker_niceness)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")

# Settings every timing bench runs with, as docs/benchmarks.md reports them: admitting one step
# ahead is off by default for now (see docs/design.md), so the benches turn it on here, once.
REPORTED_SETTINGS = ("rollout.admit_ahead_steps=1",)


def compose(*overrides: str) -> Any:
    """The config ``python -m relaxrl.train`` would build from ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def bench_dir(name: str) -> str:
    return tempfile.mkdtemp(prefix=f"relaxrl-bench-{name}-")


def run(cfg: Any) -> tuple[dict, list[dict]]:
    """Run one experiment through the real roles; returns its summary and per-step records."""
    from relaxrl.train import run_experiment

    summary = run_experiment(cfg)
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "step" in r]
    return summary, records


def steady_steps_per_s(records: Sequence[dict], skip_frac: float = 0.1) -> float:
    """Steps per second after the first ``skip_frac`` of steps (start-up is not throughput)."""
    k = min(max(1, int(len(records) * skip_frac)), len(records) - 1)
    first, last = records[k - 1], records[-1]
    return (last["step"] - first["step"]) / max(last["wall_s"] - first["wall_s"], 1e-9)


def window_mean(values: Sequence[float], end: int, width: int) -> float:
    """Mean of ``values[end - width:end]`` (clipped at the start)."""
    chunk = values[max(0, end - width):end]
    return statistics.fmean(chunk) if chunk else float("nan")


def fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
