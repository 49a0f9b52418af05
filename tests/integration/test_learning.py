"""A fixed-seed asynchronous run must learn: reward rises by a clear margin."""

import pytest

from relaxrl.train import run_experiment
from tests.integration.helpers import make_cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quickstart_learns_with_staleness_two(ray_local, tmp_path, model_cache):
    cfg = make_cfg(tmp_path, model_cache, "rollout.max_staleness=2", "seed=0")
    s = run_experiment(cfg)
    print(f"reward_first={s['reward_first']:.3f} reward_last={s['reward_last']:.3f}")
    assert s["max_staleness_seen"] <= 2
    # Asynchronous runs are timing-dependent (which groups share a rollout batch and a version);
    # observed gains on this config: +0.18 to +0.35 from a start near 0.41.
    assert s["reward_last"] >= s["reward_first"] + 0.15
