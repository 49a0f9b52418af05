"""DAgger vs behaviour cloning vs outcome-only GRPO on a multi-turn toy env, at one label budget.

    python bench/dagger_vs_bc.py                     # guess-the-number env, 600 labels each
    python bench/dagger_vs_bc.py --env calculator --steps 240 --steps-per-iter 8 --labels 800 --decay-iters 20
    python bench/dagger_vs_bc.py --smoke             # seconds; what the test suite runs

All three start from the same randomly initialised tiny Qwen2 (CPU, fixed seeds) and take the
same number of optimizer steps on the same number of training episodes per collection:

* DAgger: per-turn teacher probability beta decays linearly 1 -> 0; the env's expert labels every
  visited state; cross-entropy on the aggregated labels; stops collecting at the label budget.
* BC: beta = 1 throughout (teacher-only episodes), the same label budget, the same training.
* GRPO: outcome reward only (no labels), groups of episodes per seed.

Success is measured on held-out seeds (never trained on) with the student alone, sampling at the
rollout temperature as it does in training (``success``) and greedily (``success_greedy``).
Ends with ``dagger_vs_bc: dagger_success=D bc_success=B grpo_success=G labels=N``, then writes the
success-vs-labels plot (docs/dagger_success_vs_labels[_<env>].png); without matplotlib it prints how to
install it (``pip install -e '.[bench]'``) instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.plotting import save_plot  # noqa: E402  (after the path insert)

ENVS = {
    "calculator": {"name": "calculator", "ops": ["+"], "min_operand": 10, "max_operand": 99, "max_turns": 4,
                   "max_action_tokens": 14},
    "guess": {"name": "guess", "high": 15, "max_turns": 5, "max_action_tokens": 4},
}


def method_config(method: str, a: argparse.Namespace):
    from relaxrl.algorithms.dagger import DAggerConfig

    common = dict(episodes_per_iter=a.episodes_per_iter, steps_per_iter=a.steps_per_iter, batch_size=a.batch_size,
                  eval_episodes=a.eval_episodes, eval_every=a.eval_every, buffer_size=a.buffer_size)
    if method == "dagger":
        return DAggerConfig(beta_schedule="linear", beta_start=1.0, beta_end=0.0, beta_decay_iters=a.decay_iters,
                            label_budget=a.labels, **common)
    if method == "bc":
        return DAggerConfig(beta_schedule="constant", beta_start=1.0, label_budget=a.labels, **common)
    return DAggerConfig(teacher="none", beta_start=0.0, beta_end=0.0, ce_weight=0.0, grpo_weight=1.0,
                        group_size=a.grpo_group, **common)


def run_method(method: str, a: argparse.Namespace, model_dir: str) -> dict:
    import torch

    from relaxrl.episodic.local import LocalEpisodes

    torch.set_num_threads(1)
    t0, c0 = time.time(), time.process_time()
    runner = LocalEpisodes(model_dir, ENVS[a.env], method_config(method, a), lr=a.lr, seed=a.seed,
                           micro_batch_size=a.batch_size)
    res = runner.run(a.steps)
    return {"method": method, "labels": res.labels, "episodes": res.episodes, "curve": res.curve,
            "final": res.final, "evicted": res.evicted, "labels_dropped": res.labels_dropped,
            "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}


def draw(results: dict, env: str) -> Callable:
    """The figure: success vs labels (GRPO, which takes none, as a line) and success vs steps."""
    return lambda plt: _draw(plt, results, env)


def _draw(plt, results: dict, env: str):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"dagger": ("DAgger", "C0"), "bc": ("BC (teacher-only episodes)", "C1"), "grpo": ("GRPO (outcome only)", "C2")}
    for m, r in results.items():
        name, color = styles[m]
        xs = [p["labels"] for p in r["curve"]]
        steps = [p["step"] for p in r["curve"]]
        ys = [p["success"] for p in r["curve"]]
        if m == "grpo":
            left.axhline(r["final"]["success"], color=color, ls="--", label=f"{name}: 0 labels, same steps")
        else:
            left.plot(xs, ys, "o-", color=color, label=name)
        right.plot(steps, ys, "o-", color=color, label=name)
    left.set_xlabel("teacher labels collected")
    left.set_ylabel("held-out success (student alone)")
    left.set_title(f"{env}: success vs teacher labels")
    right.set_xlabel("optimizer steps")
    right.set_title("success vs steps (same steps for all)")
    for ax in (left, right):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def summary_line(results: dict) -> str:
    """The last line: each method's held-out success (nan for a method not run) and DAgger's labels."""
    succ = {m: results[m]["final"]["success"] if m in results else float("nan") for m in ("dagger", "bc", "grpo")}
    labels = results.get("dagger", results.get("bc", {})).get("labels", 0)
    return (f"dagger_vs_bc: dagger_success={succ['dagger']:.3f} bc_success={succ['bc']:.3f} "
            f"grpo_success={succ['grpo']:.3f} labels={labels}")


def report(results: dict, a: argparse.Namespace, wall_s: float) -> None:
    """Table, curves and the summary line first; then the JSON and the plot (skipped without matplotlib),
    so a missing plotting library never costs the runs' results."""
    print(f"{'method':8} {'labels':>7} {'episodes':>8} {'success':>8} {'greedy':>7} {'cpu_s':>7}")
    for m, r in results.items():
        f = r["final"]
        print(f"{m:8} {r['labels']:7d} {r['episodes']:8d} {f['success']:8.3f} {f['success_greedy']:7.3f} "
              f"{r['cpu_s']:7.1f}")
    for m, r in results.items():
        print(f"curve {m}: " + " ".join(f"{p['labels']}:{p['success']:.2f}/{p['success_greedy']:.2f}"
                                          for p in r["curve"]))
    print(f"bench wall_s={wall_s:.0f}")
    print(summary_line(results), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "results": results}, fh, indent=1)
    if a.plot:
        save_plot("dagger_vs_bc", a.plot, draw(results, a.env))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", choices=sorted(ENVS), default="guess")
    p.add_argument("--labels", type=int, default=600, help="teacher-label budget of DAgger and BC")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every method")
    p.add_argument("--episodes-per-iter", type=int, default=16)
    p.add_argument("--steps-per-iter", type=int, default=5)
    p.add_argument("--decay-iters", type=int, default=10, help="DAgger: iterations for beta 1 -> 0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer-size", type=int, default=4096)
    p.add_argument("--grpo-group", type=int, default=8)
    p.add_argument("--eval-episodes", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=8, help="collections between held-out evaluations")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="dagger,bc,grpo")
    p.add_argument("--workers", type=int, default=2, help="methods run in parallel processes")
    p.add_argument("--plot", default=None, help="where the plot goes (default: docs/dagger_success_vs_labels.png, with _<env> before .png for an env other than guess); '' for none")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/relaxrl/models"))
    p.add_argument("--smoke", action="store_true", help="a few steps of each method in this process, no plot")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.labels, a.episodes_per_iter, a.steps_per_iter, a.decay_iters = 4, 24, 4, 2, 2
        a.batch_size, a.grpo_group, a.eval_episodes, a.eval_every, a.workers = 8, 4, 4, 1, 1
        a.plot = a.plot or ""
    if a.plot is None:  # one plot per env: the calculator run must not overwrite the guess one
        a.plot = "docs/dagger_success_vs_labels" + ("" if a.env == "guess" else f"_{a.env}") + ".png"
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from relaxrl.models.loading import prepare_tiny_model_dir

    model_dir = prepare_tiny_model_dir(cache_dir=a.cache_dir, model_kwargs={"seed": a.seed}, warm_start_pairs_fn=None,
                                       warm_start={}, key_extra={"purpose": "dagger_bench"})
    methods = a.methods.split(",")
    t0 = time.time()
    if a.workers <= 1:  # in this process (the smoke test's)
        results = {m: run_method(m, a, model_dir) for m in methods}
    else:
        with ProcessPoolExecutor(max_workers=a.workers) as pool:
            futures = {m: pool.submit(run_method, m, a, model_dir) for m in methods}
            results = {m: f.result() for m, f in futures.items()}
    report(results, a, time.time() - t0)


if __name__ == "__main__":
    main()
