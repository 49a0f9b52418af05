"""DAgger vs behaviour cloning vs outcome-only GRPO on a multi-turn toy env, at one label budget, over seeds.

    python bench/dagger_vs_bc.py                     # gridwalk (covariate shift), seeds 0,1,2
    python bench/dagger_vs_bc.py --env guess --labels 600 --steps 300 --steps-per-iter 5 --decay-iters 10 \
        --hold-iters 0 --lr 3e-3 --seeds 0 --eval-episodes 128 --batch-size 32
    python bench/dagger_vs_bc.py --smoke             # seconds; what the test suite runs

``gridwalk`` (relaxrl/envs/gridwalk.py) is the env built for DAgger: an open grid walked from ``a0``
to a goal drawn per seed, deterministic here (``slip=0``, so the student's own mistakes are the only
drift), whose expert demonstrations only move down and right, on 180 of its 1,260 states; the
states one wrong move leads to, and the moves back from them, are never in them. ``guess`` and
``calculator`` have expert paths small enough to memorise (BC wins there). On gridwalk too a tiny
student fits the expert's walks and then makes no mistake to recover from (docs/dagger.md).

Every seed starts the three methods from the same randomly initialised tiny Qwen2 (the seed's),
CPU, and they take the same number of optimizer steps on the same number of training episodes per
collection:

* DAgger: per-turn teacher probability beta 1 for ``--hold-iters`` collections (the student first
  learns the expert's states, on BC's episodes), then linearly 1 -> 0; the env's expert labels every
  visited state; cross-entropy on the aggregated labels; stops collecting at the label budget.
* BC: beta = 1 throughout (teacher-only episodes), the same label budget, the same training.
* GRPO: outcome reward only (no labels), groups of episodes per seed.

Success is measured on held-out env seeds (never trained on) with the student alone, sampling at
the rollout temperature as it does in training (``success``) and greedily (``success_greedy``).
Prints a row per method and seed, then ends with
``dagger_vs_bc: dagger_success=D bc_success=B grpo_success=G labels=N seeds=S`` (medians over the
seeds), then writes the success-vs-labels plot (docs/dagger_success_vs_labels[_<env>].png); without
matplotlib it prints how to install it (``pip install -e '.[bench]'``) instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
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
    "gridwalk": {"name": "gridwalk", "size": 6, "slip": 0.0, "max_turns": 20, "max_action_tokens": 2, "obs": "cells"},
}


# The student: the default tiny Qwen2 (2 layers, width 128), or a smaller one that cannot fit the expert exactly.
MODELS = {"tiny": {}, "small": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                "intermediate_size": 128}}


def method_config(method: str, a: argparse.Namespace):
    from relaxrl.algorithms.dagger import DAggerConfig

    common = dict(episodes_per_iter=a.episodes_per_iter, steps_per_iter=a.steps_per_iter, batch_size=a.batch_size,
                  eval_episodes=a.eval_episodes, eval_every=a.eval_every, buffer_size=a.buffer_size)
    if method == "dagger":
        return DAggerConfig(beta_schedule="linear", beta_start=1.0, beta_end=0.0, beta_decay_iters=a.decay_iters,
                            beta_hold_iters=a.hold_iters, label_budget=a.labels, **common)
    if method == "bc":
        return DAggerConfig(beta_schedule="constant", beta_start=1.0, label_budget=a.labels, **common)
    return DAggerConfig(teacher="none", beta_start=0.0, beta_end=0.0, ce_weight=0.0, grpo_weight=1.0,
                        group_size=a.grpo_group, **common)


def env_config(a: argparse.Namespace) -> dict:
    """The ENVS entry with ``--max-turns`` and each ``--env-set KEY=VALUE`` (YAML-typed) applied."""
    import yaml

    env = {**ENVS[a.env], **({"max_turns": a.max_turns} if a.max_turns else {})}
    for item in a.env_set:
        key, sep, value = item.partition("=")
        if not sep or key not in env:
            raise SystemExit(f"--env-set {item!r}: expected KEY=VALUE with KEY one of {sorted(env)}")
        env[key] = yaml.safe_load(value)
    return env


def model_dir_for(a: argparse.Namespace, seed: int) -> str:
    """The seed's random tiny model (built once, cached); every method of the seed starts from it."""
    from relaxrl.models.loading import prepare_tiny_model_dir

    # A student's early, random episodes run past the default 256 positions (invalid actions are long).
    size = {} if a.model == "tiny" else MODELS[a.model]
    kwargs = {"seed": seed, "max_position_embeddings": 512, **size}
    return prepare_tiny_model_dir(cache_dir=a.cache_dir, model_kwargs=kwargs,
                                  warm_start_pairs_fn=None, warm_start={}, key_extra={"purpose": "dagger_bench"})


def run_method(method: str, seed: int, a: argparse.Namespace, model_dir: str) -> dict:
    import torch

    from relaxrl.episodic.local import LocalEpisodes

    torch.set_num_threads(1)
    t0, c0 = time.time(), time.process_time()
    env = env_config(a)
    runner = LocalEpisodes(model_dir, env, method_config(method, a), lr=a.lr, seed=seed,
                           micro_batch_size=a.batch_size)
    res = runner.run(a.steps)
    out = {"method": method, "seed": seed, "labels": res.labels, "episodes": res.episodes, "curve": res.curve,
           "final": res.final, "fit": res.last_metrics.get("teacher_token_logprob", float("nan")),
           "evicted": res.evicted, "labels_dropped": res.labels_dropped,
           "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    print(f"done {method} seed {seed}: success={res.final['success']:.3f} in {out['wall_s']:.0f}s",
          file=sys.stderr, flush=True)
    return out


STYLES = {"dagger": ("DAgger (beta 1, then 1 -> 0)", "C0"), "bc": ("BC (teacher-only episodes)", "C1"),
          "grpo": ("GRPO (outcome only)", "C2")}


def median_curve(per_seed: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """Median labels, steps and success over seeds at each evaluation (every seed evaluates at the same steps)."""
    n = min(len(r["curve"]) for r in per_seed)
    med = lambda key, i: statistics.median(r["curve"][i][key] for r in per_seed)  # noqa: E731
    return ([med("labels", i) for i in range(n)], [med("step", i) for i in range(n)],
            [med("success", i) for i in range(n)])


def draw(runs: dict, env: str) -> Callable:
    """The figure: success vs labels (GRPO, which takes none, as a line) and success vs steps; the
    median over seeds bold, each seed thin."""
    return lambda plt: _draw(plt, runs, env)


def _draw(plt, runs: dict, env: str):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    seeds = sorted(runs)
    for m in [m for m in STYLES if any(m in runs[s] for s in seeds)]:
        name, color = STYLES[m]
        per_seed = [runs[s][m] for s in seeds if m in runs[s]]
        for r in per_seed:
            xs, steps, ys = ([p[k] for p in r["curve"]] for k in ("labels", "step", "success"))
            if m != "grpo":
                left.plot(xs, ys, "-", color=color, alpha=0.25, lw=1)
            right.plot(steps, ys, "-", color=color, alpha=0.25, lw=1)
        xs, steps, ys = median_curve(per_seed)
        label = f"{name}, median of {len(per_seed)} seeds"
        if m == "grpo":
            left.axhline(ys[-1], color=color, ls="--", label=f"{name}: 0 labels, same steps")
        else:
            left.plot(xs, ys, "o-", color=color, label=label)
        right.plot(steps, ys, "o-", color=color, label=label)
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


def medians(runs: dict) -> dict[str, float]:
    """Each method's median held-out success over the seeds it ran (nan for a method not run)."""
    out = {}
    for m in STYLES:
        vals = [runs[s][m]["final"]["success"] for s in runs if m in runs[s]]
        out[m] = statistics.median(vals) if vals else float("nan")
    return out


def summary_line(runs: dict) -> str:
    """The last line: each method's median held-out success, DAgger's labels (the budget) and the seeds."""
    succ = medians(runs)
    any_seed = runs[min(runs)]
    labels = any_seed.get("dagger", any_seed.get("bc", {})).get("labels", 0)
    return (f"dagger_vs_bc: dagger_success={succ['dagger']:.3f} bc_success={succ['bc']:.3f} "
            f"grpo_success={succ['grpo']:.3f} labels={labels} seeds={len(runs)}")


def report(runs: dict, a: argparse.Namespace, wall_s: float) -> None:
    """Per-seed table and curves, per-seed and median lines, the summary line; then the JSON and the
    plot (skipped without matplotlib), so a missing plotting library never costs the runs' results.

    ``runs``: ``{seed: {method: result}}``."""
    print(f"{'method':8} {'seed':>4} {'labels':>7} {'episodes':>8} {'success':>8} {'greedy':>7} {'cpu_s':>7}")
    for s in sorted(runs):
        for m, r in runs[s].items():
            f = r["final"]
            print(f"{m:8} {s:4d} {r['labels']:7d} {r['episodes']:8d} {f['success']:8.3f} {f['success_greedy']:7.3f} "
                  f"{r['cpu_s']:7.1f}")
    for s in sorted(runs):
        for m, r in runs[s].items():
            print(f"curve {m} seed {s}: " + " ".join(f"{p['labels']}:{p['success']:.2f}/{p['success_greedy']:.2f}"
                                                     for p in r["curve"]))
    for s in sorted(runs):  # how well each student fits its own labels: BC failing with a good fit is covariate shift
        print(f"fit seed {s}: " + " ".join(f"{m}={r.get('fit', float('nan')):.3f}" for m, r in runs[s].items()
                                            if m != "grpo") + " (teacher-token log-prob, last step's labels)")
    for s in sorted(runs):
        print(f"seed {s}: " + " ".join(f"{m}={r['final']['success']:.3f}" for m, r in runs[s].items()))
    cpu = sum(r["cpu_s"] for rs in runs.values() for r in rs.values())
    print(f"bench wall_s={wall_s:.0f} cpu_s={cpu:.0f}")
    print(summary_line(runs), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "runs": {str(s): rs for s, rs in runs.items()}}, fh, indent=1)
    if a.plot:
        save_plot("dagger_vs_bc", a.plot, draw(runs, a.env))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", choices=sorted(ENVS), default="gridwalk")
    p.add_argument("--labels", type=int, default=1600, help="teacher-label budget of DAgger and BC")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every method")
    p.add_argument("--episodes-per-iter", type=int, default=16)
    p.add_argument("--steps-per-iter", type=int, default=20)
    p.add_argument("--decay-iters", type=int, default=4, help="DAgger: iterations for beta 1 -> 0")
    p.add_argument("--hold-iters", type=int, default=8, help="DAgger: iterations at beta = 1 before the decay")
    p.add_argument("--env-set", action="append", default=[], metavar="KEY=VALUE", help="override an env setting")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer-size", type=int, default=4096)
    p.add_argument("--grpo-group", type=int, default=8)
    p.add_argument("--eval-episodes", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=4, help="collections between held-out evaluations")
    p.add_argument("--max-turns", type=int, default=0, help="the env's turn limit; 0: the ENVS entry's")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="the student's size")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="3e-3 (the default until 2026-12-03) made long training on a fixed label set unstable")
    p.add_argument("--seeds", default="0,1,2", help="model-init and run seeds; the summary is their median")
    p.add_argument("--methods", default="dagger,bc,grpo")
    p.add_argument("--workers", type=int, default=2, help="(method, seed) runs in parallel processes")
    p.add_argument("--plot", default=None, help="where the plot goes (default: docs/dagger_success_vs_labels_<env>.png; for guess docs/dagger_success_vs_labels.png); '' for none")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/relaxrl/models"))
    p.add_argument("--smoke", action="store_true", help="4 steps of each method, 2 seeds, 6-turn episodes, in this process, no plot")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.labels, a.episodes_per_iter, a.steps_per_iter, a.decay_iters, a.hold_iters = 4, 24, 4, 2, 2, 0
        a.batch_size, a.grpo_group, a.eval_episodes, a.eval_every, a.workers = 8, 4, 4, 2, 1
        a.seeds, a.max_turns, a.plot = "0,1", a.max_turns or 6, a.plot or ""  # short episodes: seconds
    if a.plot is None:  # one plot per env: one env's run must not overwrite another's
        a.plot = "docs/dagger_success_vs_labels" + ("" if a.env == "guess" else f"_{a.env}") + ".png"
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    seeds = [int(x) for x in a.seeds.split(",")]
    methods = a.methods.split(",")
    unknown = sorted(set(methods) - set(STYLES))
    if unknown or not seeds:
        raise SystemExit(f"--methods: unknown {unknown}; valid: {list(STYLES)}" if unknown else "--seeds: none given")
    dirs = {s: model_dir_for(a, s) for s in seeds}
    jobs = [(m, s) for s in seeds for m in methods]
    t0 = time.time()
    if a.workers <= 1:  # in this process (the smoke test's)
        done = {job: run_method(*job, a, dirs[job[1]]) for job in jobs}
    else:
        with ProcessPoolExecutor(max_workers=a.workers) as pool:
            futures = {job: pool.submit(run_method, *job, a, dirs[job[1]]) for job in jobs}
            done = {job: f.result() for job, f in futures.items()}
    runs = {s: {m: done[(m, s)] for m in methods} for s in seeds}
    report(runs, a, time.time() - t0)


if __name__ == "__main__":
    main()
