"""DAgger learns a multi-turn game in-process: held-out success crosses a threshold (fixed seeds)."""

import asyncio

from relaxrl.algorithms.dagger import DAggerConfig
from relaxrl.episodic.local import LocalEpisodes
from relaxrl.episodic.loop import eval_seeds
from relaxrl.models.loading import prepare_tiny_model_dir


def test_dagger_learns_guessing_by_binary_search_on_held_out_seeds(model_cache):
    model_dir = prepare_tiny_model_dir(cache_dir=model_cache, model_kwargs={}, warm_start_pairs_fn=None,
                                       warm_start={}, key_extra={"purpose": "dagger-test"})
    cfg = DAggerConfig(beta_schedule="linear", beta_decay_iters=4, episodes_per_iter=16, steps_per_iter=5,
                       batch_size=32, eval_episodes=32, label_budget=600)
    env = {"name": "guess", "high": 7, "max_turns": 3, "max_action_tokens": 2}
    runner = LocalEpisodes(model_dir, env, cfg, lr=3e-3, seed=0)
    before = asyncio.run(runner.evaluate(eval_seeds(32)))
    res = runner.run(60)
    assert before["success_greedy"] <= 0.3
    assert res.final["success_greedy"] >= 0.8  # 3 guesses suffice for 1..7 only by binary search
    assert 0 < res.labels <= 600 and res.steps == 60 and res.evicted == 0
