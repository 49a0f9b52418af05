"""Pre-registered λ* cliff test on the structured-output toy (``+experiment=lambda_cliff``).

    python bench/lambda_cliff.py                 # full sweep, two clip values (~20 min on 2 idle cores)
    python bench/lambda_cliff.py --fast          # a few points, a few steps (the test suite's version)

The experiment clips π/π_B (``algorithm.clip_reference=base``), the clip λ*(p, b, c) is derived for
(docs/lambda_star.md); ``algorithm.clip_reference=behaviour`` runs the same protocol with PPO's clip.

1. Pre-register: sample the base (warm-start student) on training prompts, score the samples under
   the teacher and the base, estimate p and b at the structural positions with the estimator the
   scheduler uses, and print the predicted λ*(p, b, c) for both clip values (``--clips``, the test
   and the cross-prediction) with their grids, and write them to ``<out>/prereg.json``, *before* any
   training run.
2. Per clip value, sweep fixed λ over the coarse grid (1, 4) plus 0.8, 0.9, ..., 1.2 × the
   prediction (a resolution of 10% of it): one synchronous on-policy run each, in-process with
   RelaxRL's engines, env and algorithm (no Ray: on a shared 2-core box Serve's per-run startup
   would cost more than the runs; the same config runs on the framework with
   ``python -m relaxrl.train +experiment=lambda_cliff algorithm.lam=L``).
3. Per clip value, one scheduler run (``algorithm.schedule=lambda_star``, λ_target = the grid's top).
4. Report parse validity and accuracy on parsed outputs per λ (on-policy samples of the last
   ``--tail`` fraction of steps), the observed cliff interval [A, B] (the grid step in which
   validity first falls below 90% of the λ = 1 run; also below 90% of the base's), whether the
   prediction lies in it, and the last line

   lambda_cliff: predicted=P observed_lo=A observed_hi=B scheduler_validity=V baseline_validity=W
   scheduler_accuracy=X baseline_accuracy=Y inside=yes|no c=C cross_c=C2 cross_predicted=P2
   cross_observed_lo=A2 cross_observed_hi=B2 cross_inside=yes|no clip_reference=base|behaviour

5. Then plot validity and accuracy vs λ per clip value with the predicted λ* drawn (``--plot``, by
   default ``<out>/lambda_cliff.png``; without matplotlib it prints ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each (before torch loads)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import plot_lambda_cliff  # noqa: E402  (after the path insert)
from bench.plotting import save_plot  # noqa: E402

BASE_GRID = [1.0, 4.0]  # coarse (λ=1 the baseline); the fine grid around each prediction is added
FINE = (0.8, 0.9, 1.0, 1.1, 1.2)  # × the prediction: a resolution of 10% of it
CLIFF_FRACTION = 0.9  # the cliff: validity below this fraction of the reference (the λ = 1 run's, the base's)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    import relaxrl.config  # noqa: F401  (schemas)

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return hydra_compose(config_name="config", overrides=["+experiment=lambda_cliff", *overrides])


def measure_pbc(toy: "Toy", clips: list[float], n_prompts: int = 64) -> dict:
    """p, b (binding structural class) and λ* per clip strength from the base's own samples, and the
    base's parse validity, before any training."""
    from relaxrl.algorithms import make_algorithm
    from relaxrl.engines.base import SamplingParams
    from relaxrl.launch import plain
    from relaxrl.models.chat import render_prompt_ids
    from relaxrl.sample import Sample, collate

    cfg, base, teacher = toy.cfg, toy.base, toy.teacher
    tasks = toy.env.tasks("train", cfg.seed + 12_345)  # not the runs' prompt stream
    r = cfg.rollout
    group = [next(tasks) for _ in range(n_prompts)]
    prompts = [render_prompt_ids(base.tokenizer, t.prompt) for t in group for _ in range(r.group_size)]
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=cfg.seed)
    gens = base.generate(prompts, params)
    seqs = [p + g.response_ids for p, g in zip(prompts, gens)]
    lens = [len(p) for p in prompts]
    t_lp, b_lp = teacher.score(seqs, lens).logprobs, base.score(seqs, lens).logprobs
    samples = [
        Sample(uid=str(i), group_id=str(i), index=0, prompt_ids=p, response_ids=g.response_ids,
               behaviour_logprobs=g.logprobs, reward=0.0, teacher_logprobs=t, ref_logprobs=bl)
        for i, (p, g, t, bl) in enumerate(zip(prompts, gens, t_lp, b_lp))
    ]
    batch = collate(samples, base.pad_id)
    by_c = {}
    for c in clips:  # the binding class is the one with the smallest λ*, which may depend on c
        est = make_algorithm({**plain(cfg.algorithm), "ema": 0.0, "schedule": "fixed", "clip_c": c}).step_lambda(batch)
        tok = int(est["binding_class"])
        by_c[c] = {**est, "binding_token": base.tokenizer.convert_ids_to_tokens(tok) if tok >= 0 else "?"}
    valid = [toy.env.response_info(base.tokenizer.decode(g.response_ids[:-1] if g.finish_reason == "stop" else
                                                         g.response_ids, skip_special_tokens=True),
                                   group[i // r.group_size])["valid"] for i, g in enumerate(gens)]
    return {"by_c": by_c, "structural_positions": by_c[clips[0]]["structural_positions"], "samples": len(samples),
            "base_validity": sum(valid) / len(valid)}


class Toy:
    """The engines, env and models of one configuration, loaded once and shared by all runs."""

    def __init__(self, cfg) -> None:
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.envs.registry import make_env
        from relaxrl.launch import plain, prepare_model_dir, prepare_teacher_dir

        self.cfg = cfg
        self.base_dir, self.teacher_dir = prepare_model_dir(cfg), prepare_teacher_dir(cfg)
        self.base = HFGenerationEngine.from_pretrained(self.base_dir)
        self.teacher = HFGenerationEngine.from_pretrained(self.teacher_dir)
        self.env = make_env(**plain(cfg.env))


def run_inprocess(toy: Toy, cfg, seed: int) -> list[dict]:
    """One synchronous on-policy run with RelaxRL's engines, env and algorithm, without Ray.

    Per step: sample ``groups_per_step × group_size`` responses from the student, verify them,
    score them under the teacher and the base, one optimizer step of ``cfg.algorithm``. Returns
    per-step metrics with the same keys as a framework run's metrics.jsonl.
    """
    from relaxrl.algorithms import make_algorithm
    from relaxrl.engines.base import SamplingParams
    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.engines.torch_trainer import TorchTrainerEngine
    from relaxrl.launch import plain
    from relaxrl.metrics import info_means
    from relaxrl.models.chat import render_prompt_ids
    from relaxrl.sample import Sample, collate

    tr, r = cfg.trainer, cfg.rollout
    algo = make_algorithm(plain(cfg.algorithm))
    trainer = TorchTrainerEngine.from_pretrained(
        toy.base_dir, lr=tr.lr, max_grad_norm=tr.max_grad_norm, micro_batch_size=tr.micro_batch_size,
        temperature=r.temperature, seed=seed)
    student = HFGenerationEngine(trainer.model, toy.base.tokenizer)  # shares the trained module: always fresh
    tasks = toy.env.tasks("train", seed)
    rows = []
    for step in range(1, tr.steps + 1):
        group = [next(tasks) for _ in range(r.groups_per_step)]
        prompts = [render_prompt_ids(student.tokenizer, t.prompt) for t in group for _ in range(r.group_size)]
        params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                seed=seed * 1_000_003 + step)
        gens = student.generate(prompts, params)
        seqs = [p + g.response_ids for p, g in zip(prompts, gens)]
        lens = [len(p) for p in prompts]
        t_lp, b_lp = toy.teacher.score(seqs, lens).logprobs, toy.base.score(seqs, lens).logprobs
        samples = []
        for i, (p, g) in enumerate(zip(prompts, gens)):
            task = group[i // r.group_size]
            ids = g.response_ids[:-1] if g.finish_reason == "stop" else g.response_ids
            text = student.tokenizer.decode(ids, skip_special_tokens=True)
            samples.append(Sample(
                uid=f"{step}/{i}", group_id=f"{step}/{i // r.group_size}", index=i % r.group_size, prompt_ids=p,
                response_ids=g.response_ids, behaviour_logprobs=g.logprobs, policy_version=trainer.version,
                reward=toy.env.verify(text, task), reward_info=toy.env.response_info(text, task),
                teacher_logprobs=t_lp[i], ref_logprobs=b_lp[i]))
        batch = algo.prepare(collate(samples, student.pad_id))
        metrics = trainer.train_step(batch, algo.loss)
        rows.append({"step": step, "samples": len(samples), **metrics,
                     **{f"algo/{k}": v for k, v in batch.scalars.items()},
                     **info_means([s.reward_info for s in samples])})
    return rows


def run_one(toy: Toy, cfg, seed: int) -> dict:
    t0 = time.time()
    rows = run_inprocess(toy, cfg, seed)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.run_dir, "metrics.jsonl").write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
    return {"steps": rows, "wall_s": time.time() - t0}


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
    """The base grid plus the fine grid 0.8, 0.9, ..., 1.2 × the prediction (resolution 10% of it,
    so the prediction is always bracketed by runs; points above twice the grid's top are left out)."""
    extra = [predicted * f for f in FINE] if math.isfinite(predicted) else []
    return sorted({round(x, 3) for x in base_grid + [e for e in extra if 0 < e <= 2 * max(base_grid)]})


def observed_interval(results: dict[float, dict], reference_validity: float) -> tuple[float, float]:
    """The grid step [A, B] in which validity first falls below CLIFF_FRACTION × the reference
    (the λ = 1 run's, or the base's); A = 0 when the grid's first point is already below."""
    prev = 0.0
    for lam in sorted(results):
        if results[lam]["validity"] < CLIFF_FRACTION * reference_validity:
            return prev, lam
        prev = lam
    return math.nan, math.nan


def inside(predicted: float, interval: tuple[float, float]) -> bool:
    lo, hi = interval
    return bool(math.isfinite(lo) and lo <= predicted <= hi)


def preregister(pre: dict, clips: list[float], base_grid: list[float], fast: bool, path: Path) -> dict[float, list]:
    """Print and write the locked predictions and each clip's grid before any sweep run."""
    grids = {}
    for c in clips:
        e = pre["by_c"][c]
        grids[c] = sorted(base_grid) if fast else make_grid(e["lambda_star"], base_grid)
        print(f"pre-registered: c={c:g} p={e['p']:.4f} b={e['b']:.4f} binding_token={e['binding_token']!r} "
              f"structural_positions={int(pre['structural_positions'])} base_validity={pre['base_validity']:.3f} "
              f"predicted_lambda_star={e['lambda_star']:.3f}", flush=True)
        print(f"grid (c={c:g}): {grids[c]}", flush=True)
    path.write_text(json.dumps({"prereg": pre, "grids": {str(c): g for c, g in grids.items()},
                                "locked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                               indent=1, default=float))
    return grids


def sweep(toy: Toy, overrides: list[str], c: float, predicted: float, grid: list[float], pre: dict,
          args, out: Path) -> dict:
    """The fixed-λ runs and the scheduler run at clip c; the observed intervals and verdicts."""
    results: dict[float, dict] = {}
    at_c = [*overrides, f"algorithm.clip_c={c}"]
    for lam in grid:
        run = run_one(toy, compose(at_c + [f"algorithm.lam={lam}", f"run_dir={out}/c{c:g}/lam_{lam}"]), args.seed)
        results[lam] = tail_metrics(run["steps"], args.tail)
        print(f"c={c:g} lambda={lam:<6} validity={results[lam]['validity']:.3f} "
              f"accuracy={results[lam]['accuracy']:.3f} lambda_star_est={results[lam]['lambda_star_last']:.3f} "
              f"wall_s={run['wall_s']:.0f}", flush=True)
    target = max(grid)
    run = run_one(toy, compose(at_c + ["algorithm.schedule=lambda_star", f"algorithm.lam={target}",
                                       f"run_dir={out}/c{c:g}/scheduler"]), args.seed)
    sched = tail_metrics(run["steps"], args.tail)
    print(f"c={c:g} scheduler (target={target}): lambda_mean={sched['lambda_mean']:.3f} "
          f"validity={sched['validity']:.3f} accuracy={sched['accuracy']:.3f} wall_s={run['wall_s']:.0f}", flush=True)
    base = results[1.0]
    observed = observed_interval(results, base["validity"])
    vs_base = observed_interval(results, pre["base_validity"])
    return {"c": c, "grid": grid, "results": {str(k): v for k, v in results.items()}, "scheduler": sched,
            "observed": list(observed), "observed_vs_base": list(vs_base), "predicted": predicted,
            "prediction_inside": inside(predicted, observed), "inside_vs_base": inside(predicted, vs_base),
            "scheduler_validity_ratio": sched["validity"] / base["validity"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="λ in {1, 3} + scheduler, few steps (the test's version)")
    ap.add_argument("--grid", type=str, default=None, help="comma-separated coarse grid (default 1,4)")
    ap.add_argument("--clips", type=str, default="2,4",
                    help="clip strengths c: the first is the main test, the second the cross-prediction")
    ap.add_argument("--steps", type=int, default=None, help="trainer steps per run")
    ap.add_argument("--tail", type=float, default=0.25, help="fraction of final steps the metrics average over")
    ap.add_argument("--out", type=str, default="runs/lambda_cliff", help="run dirs and results.json go here")
    ap.add_argument("--seed", type=int, default=0, help="the same prompts and sampling seeds for every run")
    ap.add_argument("--plot", type=str, default=None,
                    help="where the validity/accuracy-vs-λ plot goes (default: <out>/lambda_cliff.png); '' for none")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides) + ["logger.progress=false", "trainer.save_final=false"]
    if args.steps is not None:
        overrides.append(f"trainer.steps={args.steps}")
    base_grid = [1.0, 3.0] if args.fast else list(BASE_GRID)
    if args.grid:
        base_grid = [float(x) for x in args.grid.split(",")]
    if 1.0 not in base_grid:
        base_grid.append(1.0)  # the baseline (plain OPD)
    clips = [float(x) for x in args.clips.split(",")]
    if len(clips) != 2:
        raise SystemExit(f"--clips takes two clip strengths (the test and the cross-prediction), got {args.clips!r}")

    cfg0 = compose(overrides + [f"run_dir={out}/prereg"])
    clip_reference = cfg0.algorithm.clip_reference
    toy = Toy(cfg0)
    pre = measure_pbc(toy, clips)
    grids = preregister(pre, clips, base_grid, args.fast, out / "prereg.json")

    sweeps = [sweep(toy, overrides, c, pre["by_c"][c]["lambda_star"], grids[c], pre, args, out) for c in clips]
    main_c, cross = sweeps
    report = {**main_c, "prereg": {**pre, **pre["by_c"][clips[0]]}, "cross": cross,
              "clip_reference": clip_reference, "wall_s": time.time() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float))
    finish(report, out / "results.json", out / "lambda_cliff.png" if args.plot is None else args.plot)
    return report


def _yes(x: bool) -> str:
    return "yes" if x else "no"


def summary_line(report: dict) -> str:
    base, sched = report["results"]["1.0"], report["scheduler"]
    lo, hi = report["observed"]
    line = (f"lambda_cliff: predicted={report['predicted']:.3f} observed_lo={lo:.3f} observed_hi={hi:.3f} "
            f"scheduler_validity={sched['validity']:.3f} baseline_validity={base['validity']:.3f} "
            f"scheduler_accuracy={sched['accuracy']:.3f} baseline_accuracy={base['accuracy']:.3f}")
    cross = report.get("cross")
    if cross is not None:
        clo, chi = cross["observed"]
        line += (f" inside={_yes(report['prediction_inside'])} c={report['c']:g} cross_c={cross['c']:g} "
                 f"cross_predicted={cross['predicted']:.3f} cross_observed_lo={clo:.3f} cross_observed_hi={chi:.3f} "
                 f"cross_inside={_yes(cross['prediction_inside'])}")
    if "clip_reference" in report:
        line += f" clip_reference={report['clip_reference']}"
    return line


def verdict(r: dict) -> str:
    lo, hi = r.get("observed_vs_base", (math.nan, math.nan))
    return (f"c={r.get('c', '?')}: predicted λ*={r['predicted']:.3f}; observed (90% of λ=1) {r['observed']}, "
            f"inside={_yes(r['prediction_inside'])}; observed (90% of the base's validity) [{lo}, {hi}], "
            f"inside={_yes(r.get('inside_vs_base', False))}; scheduler validity / λ=1 validity = "
            f"{r['scheduler_validity_ratio']:.3f}")


def finish(report: dict, results_path, plot_path) -> None:
    """The verdicts and the summary line first, then the plot (skipped, with the install hint, without
    matplotlib), so the sweep's numbers are printed whatever happens to the plot."""
    for r in [report] + ([report["cross"]] if report.get("cross") else []):
        print(verdict(r))
    print(f"results in {results_path}" + (f"; wall {report['wall_s']:.0f} s" if "wall_s" in report else ""))
    print(summary_line(report), flush=True)
    if plot_path:
        save_plot("lambda_cliff", str(plot_path), plot_lambda_cliff.draw(report), dpi=120)


if __name__ == "__main__":
    main()
