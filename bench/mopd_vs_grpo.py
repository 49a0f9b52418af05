"""MOPD vs GRPO on mixed data after sequential training forgets a domain (tiny model, CPU, fixed seeds).

    python bench/mopd_vs_grpo.py [--out docs/img] [--steps 60] [--grpo-steps 120] [--seeds 0,1,2] [Hydra overrides ...]
    python bench/mopd_vs_grpo.py --report docs/img/mopd_vs_grpo.json   # summary and plot again, no runs

Per seed (Hydra ``seed=S``) it runs the ``mopd_toy`` pipeline (GRPO on add -> GRPO on sub -> MOPD over
add and sub, teachers from the checkpoint registry) plus a fourth stage, GRPO on the mixed add+sub data,
started from the same post-sub checkpoint as MOPD. Both comparison stages are evaluated (greedy, per
domain) after every step. A method *reaches* its target at the first step at which both domains are at
>= 95% of their teacher's registered score; a method that never gets there within its budget
(``--steps``, ``--grpo-steps``) is reported as ``reached=no`` and gives no step count, so no ratio.

Prints one line per seed (``reached=yes|no`` for each method), then the summary line

    mopd_vs_grpo: step_ratio=R mopd_steps=M grpo_steps=G seeds=N both_reached=K mopd_reached=A grpo_reached=B

R is the median over the K seeds where both methods reached of MOPD steps / GRPO steps (``none`` when
K = 0); M and G are each method's median steps over the seeds where it reached (``none`` when it never
did). Then it writes ``mopd_vs_grpo.json`` and ``mopd_vs_grpo.png`` (per-domain accuracy vs step for
both methods, one row per seed) to ``--out``; without matplotlib it prints how to install it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.plotting import save_plot  # noqa: E402  (after the path insert)

TARGET = 0.95
METHODS = ("MOPD", "GRPO on mixed data")


def steps_to_target(history: list[dict], targets: dict[str, float]) -> int | None:
    """First evaluated step at which every domain's accuracy is >= its target (None: never)."""
    for row in history:
        if all(row["domains"][d]["accuracy"] >= t for d, t in targets.items()):
            return row["step"]
    return None


@dataclass(frozen=True)
class MethodResult:
    steps: int | None  # first step at the target; None: not reached within the budget
    budget: int
    last_step: int
    last: dict[str, float]  # per-domain accuracy at the last evaluated step

    @property
    def reached(self) -> bool:
        return self.steps is not None


def method_result(history: list[dict], targets: dict[str, float], budget: int) -> MethodResult:
    return MethodResult(steps=steps_to_target(history, targets), budget=budget, last_step=history[-1]["step"],
                        last={d: v["accuracy"] for d, v in history[-1]["domains"].items()})


@dataclass(frozen=True)
class SeedResult:
    seed: int
    teachers: dict[str, float]
    mopd: MethodResult
    grpo: MethodResult

    @property
    def step_ratio(self) -> float | None:
        """MOPD steps / GRPO steps, only when both reached (a budget is not a measurement) and GRPO
        needed at least one step (both start from the same checkpoint: a start at target compares nothing)."""
        if not (self.mopd.reached and self.grpo.reached) or self.grpo.steps == 0:
            return None
        return self.mopd.steps / self.grpo.steps


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: list[SeedResult]) -> dict:
    """Across seeds: the median ratio where both reached, each method's median steps where it reached."""
    ratios = [r.step_ratio for r in results if r.step_ratio is not None]
    return {"step_ratio": _median(ratios),
            "mopd_steps": _median([r.mopd.steps for r in results if r.mopd.reached]),
            "grpo_steps": _median([r.grpo.steps for r in results if r.grpo.reached]),
            "seeds": len(results), "both_reached": len(ratios),
            "mopd_reached": sum(r.mopd.reached for r in results),
            "grpo_reached": sum(r.grpo.reached for r in results)}


def _num(x: float | None, spec: str) -> str:
    return "none" if x is None else format(x, spec)


def _method_text(name: str, m: MethodResult) -> str:
    at = " ".join(f"{d}={a:.3f}" for d, a in m.last.items())
    steps = f"steps={m.steps}" if m.reached else "steps=none"
    return f"{name} reached={'yes' if m.reached else 'no'} {steps} (budget {m.budget}; at step {m.last_step}: {at})"


def seed_line(r: SeedResult) -> str:
    targets = " ".join(f"{d}={TARGET * s:.3f}" for d, s in r.teachers.items())
    return (f"seed {r.seed}: targets {targets}; {_method_text('mopd', r.mopd)}; {_method_text('grpo', r.grpo)}; "
            f"step_ratio={_num(r.step_ratio, '.2f')}")


def summary_line(s: dict) -> str:
    return (f"mopd_vs_grpo: step_ratio={_num(s['step_ratio'], '.2f')} mopd_steps={_num(s['mopd_steps'], 'g')} "
            f"grpo_steps={_num(s['grpo_steps'], 'g')} seeds={s['seeds']} both_reached={s['both_reached']} "
            f"mopd_reached={s['mopd_reached']} grpo_reached={s['grpo_reached']}")


def draw(runs: dict[int, dict]) -> Callable:
    """The figure: one row per seed, one panel per domain, both methods' accuracy and the target."""
    def fig_of(plt):
        seeds = sorted(runs)
        domains = sorted(runs[seeds[0]]["teachers"])
        fig, axes = plt.subplots(len(seeds), len(domains), figsize=(5 * len(domains), 3.2 * len(seeds)),
                                 sharey=True, squeeze=False)
        for row, seed in zip(axes, seeds):
            run = runs[seed]
            for ax, d in zip(row, domains):
                for label, style in zip(METHODS, ("-o", "-s")):
                    hist = run["curves"][label]
                    ax.plot([r["step"] for r in hist], [r["domains"][d]["accuracy"] for r in hist], style, ms=3,
                            label=label)
                target = TARGET * run["teachers"][d]
                ax.axhline(target, color="grey", ls="--", lw=1, label=f"95% of teacher ({target:.2f})")
                ax.set_title(f"seed {seed}, domain {d}")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
                ax.legend(loc="best", fontsize=7, framealpha=0.6)
            row[0].set_ylabel("greedy eval accuracy")
        for ax in axes[-1]:
            ax.set_xlabel("optimizer step (from the post-sub checkpoint)")
        fig.tight_layout()
        return fig
    return fig_of


def seed_results(runs: dict[int, dict]) -> list[SeedResult]:
    """SeedResults from the per-seed records the bench writes (teachers, curves, budget)."""
    out = []
    for seed in sorted(runs):
        run = runs[seed]
        targets = {d: TARGET * s for d, s in run["teachers"].items()}
        out.append(SeedResult(seed=seed, teachers=run["teachers"],
                              mopd=method_result(run["curves"][METHODS[0]], targets, run["budget"]["mopd"]),
                              grpo=method_result(run["curves"][METHODS[1]], targets, run["budget"]["grpo_mix"])))
    return out


def report(runs: dict[int, dict], out_dir: str | None, extra: dict | None = None) -> dict:
    """Per-seed lines and the summary line first, then the JSON and the plot (which may be skipped)."""
    results = seed_results(runs)
    summary = summarize(results)
    for r in results:
        print(seed_line(r))
    print(summary_line(summary), flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "mopd_vs_grpo.json"), "w") as f:
            json.dump({**(extra or {}), "summary": summary, "per_seed": [asdict(r) for r in results],
                       "runs": {str(s): r for s, r in runs.items()}}, f, indent=1)
        save_plot("mopd_vs_grpo", os.path.join(out_dir, "mopd_vs_grpo.png"), draw(runs))
    return summary


def load_runs(path: str) -> dict[int, dict]:
    """The per-seed records of a results file (also the single-seed files written before ``--seeds``)."""
    with open(path) as f:
        data = json.load(f)
    if "runs" in data:
        return {int(s): r for s, r in data["runs"].items()}
    return {0: {k: data[k] for k in ("teachers", "curves", "budget", "stage_final_eval")}}


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    from hydra import compose, initialize_config_module

    import relaxrl.config  # noqa: F401  (registers the schemas)
    from relaxrl.pipeline.config import StageConfig
    from relaxrl.pipeline.runner import run_pipeline

    run_dir = os.path.join(args.run_dir or tempfile.mkdtemp(prefix="mopd_vs_grpo-"), f"seed_{seed}")
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[
            "+experiment=mopd_toy", f"run_dir={run_dir}", f"seed={seed}", "logger.progress=false",
            "ray.num_cpus=2", *args.overrides,
        ])
    mopd = cfg.pipeline.stages[-1]
    mopd.steps, mopd.eval_every = args.steps, 1
    post_b = cfg.pipeline.stages[-2].name  # both methods start from the post-B checkpoint
    cfg.pipeline.stages.append(StageConfig(name="grpo_mix", algorithm={"name": "grpo"}, init_from=post_b,
                                           steps=args.grpo_steps, eval_every=1))
    t0 = time.time()
    result = run_pipeline(cfg)
    stages = result["stages"]
    curves = {METHODS[0]: read_eval(stages[mopd.name]["run_dir"]), METHODS[1]: read_eval(stages["grpo_mix"]["run_dir"])}
    run = {"teachers": result["teachers"], "curves": curves, "budget": {"mopd": args.steps, "grpo_mix": args.grpo_steps},
           "stage_final_eval": {name: stages[name]["eval"] for name in stages}, "wall_s": time.time() - t0}
    for name, ev in run["stage_final_eval"].items():
        print(f"seed {seed} stage {name:10s} " + " ".join(f"{d}={v['accuracy']:.3f}" for d, v in ev.items()))
    return run


def read_eval(stage_dir: str) -> list[dict]:
    with open(os.path.join(stage_dir, "eval.jsonl")) as f:
        return [json.loads(line) for line in f]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/img", help="where the plot and the JSON results go")
    parser.add_argument("--steps", type=int, default=60, help="step budget of MOPD")
    parser.add_argument("--grpo-steps", type=int, default=120, help="step budget of GRPO on the mixed data")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one pipeline run each")
    parser.add_argument("--run-dir", default=None, help="pipeline run directories go here (default: a temp dir)")
    parser.add_argument("--report", default=None, help="no runs: summarise and plot this results JSON again")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to +experiment=mopd_toy")
    args = parser.parse_args(argv)
    if args.report:
        return report(load_runs(args.report), args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    runs = {seed: run_seed(seed, args) for seed in seeds}
    print(f"wall_s={time.time() - t0:.0f}")
    return report(runs, args.out, extra={"overrides": list(args.overrides)})


if __name__ == "__main__":
    main()
