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


def test_quickstart_learns_with_ppo_mini_batches(ray_local, tmp_path, model_cache):
    """Four updates per step (PPO mini-batches of two groups): the run learns in fewer steps. The lr
    is the quickstart's over ~3 (four AdamW updates move the weights ~4x as far per step; at the
    quickstart's 5e-4 the reward fell, 0.398 -> 0.337). Measured: 0.452 -> 0.676."""
    cfg = make_cfg(tmp_path, model_cache, "rollout.max_staleness=1", "seed=0", "trainer.mini_batches=4",
                   "trainer.steps=200", "trainer.lr=1.5e-4")
    s = run_experiment(cfg)
    print(f"reward_first={s['reward_first']:.3f} reward_last={s['reward_last']:.3f}")
    assert s["max_staleness_seen"] <= 1
    assert s["reward_last"] >= s["reward_first"] + 0.15
