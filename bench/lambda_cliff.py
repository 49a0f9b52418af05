"""Pre-registered λ* cliff test on the structured-output toy (``+experiment=lambda_cliff``).

    python bench/lambda_cliff.py                 # full sweep (<= 20 min on 2 cores)
    python bench/lambda_cliff.py --fast          # a few points, a few steps (the test suite's version)

1. Pre-register: sample the base (warm-start student) on training prompts, score the samples under
   the teacher and the base, estimate p and b at the structural positions with the estimator the
   scheduler uses, and print the predicted λ*(p, b, c) *before* any training run.
2. Sweep fixed λ over a grid (0.5 .. 4, finer around the prediction), one real RelaxRL run each.
3. One scheduler run (``algorithm.schedule=lambda_star``, λ_target = the grid's top).
4. Report parse validity and accuracy on parsed outputs per λ (on-policy samples of the last
   ``--tail`` fraction of steps), the observed cliff interval [A, B] (the grid step in which
   validity first falls below 90% of the λ = 1 run), and the last line

   lambda_cliff: predicted=P observed_lo=A observed_hi=B scheduler_validity=V baseline_validity=W ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_GRID = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]
CLIFF_FRACTION = 0.9  # the cliff: validity below this fraction of the λ = 1 run's


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    import relaxrl.config  # noqa: F401  (schemas)

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return hydra_compose(config_name="config", overrides=["+experiment=lambda_cliff", *overrides])


def measure_pbc(cfg, n_prompts: int = 64) -> dict:
    """p, b (binding structural class) and λ* from the base's own samples, before any training."""
    from relaxrl.algorithms import make_algorithm
    from relaxrl.engines.base import SamplingParams
    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.envs.registry import make_env
    from relaxrl.launch import plain, prepare_model_dir, prepare_teacher_dir
    from relaxrl.models.chat import render_prompt_ids
    from relaxrl.sample import Sample, collate

    base_dir, teacher_dir = prepare_model_dir(cfg), prepare_teacher_dir(cfg)
    base, teacher = HFGenerationEngine.from_pretrained(base_dir), HFGenerationEngine.from_pretrained(teacher_dir)
    env = make_env(**plain(cfg.env))
    tasks = env.tasks("train", cfg.seed + 12_345)  # not the runs' prompt stream
    prompts = [render_prompt_ids(base.tokenizer, next(tasks).prompt) for _ in range(n_prompts)]
    r = cfg.rollout
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=cfg.seed)
    gens = base.generate([p for p in prompts for _ in range(r.group_size)], params)
    seqs = [p + g.response_ids for p, g in zip([p for p in prompts for _ in range(r.group_size)], gens)]
    lens = [len(s) - len(g.response_ids) for s, g in zip(seqs, gens)]
    t_lp, b_lp = teacher.score(seqs, lens).logprobs, base.score(seqs, lens).logprobs
    samples = [
        Sample(uid=str(i), group_id=str(i), index=0, prompt_ids=s[:n], response_ids=s[n:],
               behaviour_logprobs=g.logprobs, reward=0.0, teacher_logprobs=t, ref_logprobs=bl)
        for i, (s, n, g, t, bl) in enumerate(zip(seqs, lens, gens, t_lp, b_lp))
    ]
    batch = collate(samples, base.pad_id)
    algo = make_algorithm({**plain(cfg.algorithm), "ema": 0.0, "schedule": "fixed"})
    est = algo.step_lambda(batch)
    token = base.tokenizer.convert_ids_to_tokens(int(est["binding_class"])) if est["binding_class"] >= 0 else "?"
    return {**est, "binding_token": token, "samples": len(samples)}


def run_one(cfg) -> dict:
    from relaxrl.train import run_experiment

    t0 = time.time()
    summary = run_experiment(cfg)
    rows = [json.loads(x) for x in Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "steps": [r for r in rows if "step" in r], "wall_s": time.time() - t0}


def tail_metrics(steps: list[dict], tail: float) -> dict:
    """Validity and accuracy on parsed outputs over the last ``tail`` fraction of steps."""
    k = max(1, int(round(len(steps) * tail)))
    last = steps[-k:]
    n = sum(s["samples"] for s in last)
    valid = sum(s["info/valid"] * s["samples"] for s in last)
    correct = sum(s["info/correct"] * s["samples"] for s in last)
    lam = sum(s["algo/lambda"] for s in last) / k
    lam_star = [s["algo/lambda_star"] for s in last]
    return {"validity": valid / n, "accuracy": correct / valid if valid else float("nan"),
            "lambda_mean": lam, "lambda_star_last": lam_star[-1], "samples": n}


def make_grid(predicted: float, base_grid: list[float]) -> list[float]:
    """The base grid plus points at 0.8, 0.9, 1.1 and 1.2 × the prediction (inside the grid's range)."""
    lo, hi = min(base_grid), max(base_grid)
    extra = [predicted * f for f in (0.8, 0.9, 1.0, 1.1, 1.2)] if math.isfinite(predicted) else []
    return sorted({round(x, 2) for x in base_grid + [e for e in extra if lo <= e <= hi]})


def observed_interval(results: dict[float, dict], baseline_validity: float) -> tuple[float, float]:
    """The grid step [A, B] in which validity first falls below CLIFF_FRACTION × the λ=1 run's."""
    grid = sorted(results)
    for prev, cur in zip(grid, grid[1:]):
        if cur > 1.0 and results[cur]["validity"] < CLIFF_FRACTION * baseline_validity:
            return prev, cur
    return math.nan, math.nan


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="λ in {1, 3} + scheduler, few steps (the test's version)")
    ap.add_argument("--grid", type=str, default=None, help="comma-separated base grid (default 0.5..4)")
    ap.add_argument("--steps", type=int, default=None, help="trainer steps per run")
    ap.add_argument("--tail", type=float, default=0.25, help="fraction of final steps the metrics average over")
    ap.add_argument("--out", type=str, default="runs/lambda_cliff", help="run dirs and results.json go here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides) + ["logger.progress=false", "trainer.save_final=false"]
    if args.steps is not None:
        overrides.append(f"trainer.steps={args.steps}")
    base_grid = [1.0, 3.0] if args.fast else BASE_GRID
    if args.grid:
        base_grid = [float(x) for x in args.grid.split(",")]
    if 1.0 not in base_grid:
        base_grid.append(1.0)  # the baseline (plain OPD)

    cfg0 = compose(overrides + [f"run_dir={out}/prereg"])
    pre = measure_pbc(cfg0)
    predicted = pre["lambda_star"]
    print(f"pre-registered: p={pre['p']:.4f} b={pre['b']:.4f} c={pre['c']:g} binding_token={pre['binding_token']!r} "
          f"structural_positions={int(pre['structural_positions'])} predicted_lambda_star={predicted:.3f}", flush=True)
    grid = sorted(base_grid) if args.fast else make_grid(predicted, base_grid)
    print(f"grid: {grid}", flush=True)

    from relaxrl.launch import init_ray

    init_ray(cfg0)
    results: dict[float, dict] = {}
    for lam in grid:
        run = run_one(compose(overrides + [f"algorithm.lam={lam}", f"run_dir={out}/lam_{lam}"]))
        results[lam] = tail_metrics(run["steps"], args.tail)
        print(f"lambda={lam:<5} validity={results[lam]['validity']:.3f} accuracy={results[lam]['accuracy']:.3f} "
              f"lambda_star_est={results[lam]['lambda_star_last']:.3f} wall_s={run['wall_s']:.0f}", flush=True)
    target = max(grid)
    run = run_one(compose(overrides + ["algorithm.schedule=lambda_star", f"algorithm.lam={target}",
                                       f"run_dir={out}/scheduler"]))
    sched = tail_metrics(run["steps"], args.tail)
    print(f"scheduler (target={target}): lambda_mean={sched['lambda_mean']:.3f} validity={sched['validity']:.3f} "
          f"accuracy={sched['accuracy']:.3f} wall_s={run['wall_s']:.0f}", flush=True)

    base = results[1.0]
    lo, hi = observed_interval(results, base["validity"])
    inside = lo <= predicted <= hi if math.isfinite(lo) else False
    report = {"prereg": pre, "grid": grid, "results": {str(k): v for k, v in results.items()}, "scheduler": sched,
              "observed": [lo, hi], "predicted": predicted, "prediction_inside": inside,
              "scheduler_validity_ratio": sched["validity"] / base["validity"]}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"prediction inside observed interval: {inside}; scheduler validity / baseline validity = "
          f"{report['scheduler_validity_ratio']:.3f}; results in {out / 'results.json'}")
    print(f"lambda_cliff: predicted={predicted:.3f} observed_lo={lo:.2f} observed_hi={hi:.2f} "
          f"scheduler_validity={sched['validity']:.3f} baseline_validity={base['validity']:.3f} "
          f"scheduler_accuracy={sched['accuracy']:.3f} baseline_accuracy={base['accuracy']:.3f}", flush=True)
    return report


if __name__ == "__main__":
    main()
