"""MOPD vs GRPO on mixed data after sequential training forgets a domain (tiny model, CPU, in-process).

    python bench/mopd_vs_grpo.py [--out docs/img] [--steps 150] [--grpo-steps 450] [--seeds 0,1,2] [key=value ...]
    python bench/mopd_vs_grpo.py --task digits --out docs/img/mopd_digits  # multi-token answers (rev vs sort)
    python bench/mopd_vs_grpo.py --smoke                                # seconds: what the test suite runs
    python bench/mopd_vs_grpo.py --report docs/img/mopd_vs_grpo.json   # summary and plot again, no runs

The experiment is ``bench/_mopd_toy.py`` (``key=value`` sets its ``ToyConfig`` fields): two domains with
the prompt format ``a?b=``, add and sub (``--task digits``: reverse vs sort a 4-digit string, ``3815r=``); stage A (warm start + GRPO on add) and stage B (warm start +
GRPO on sub, which erodes add) are built once for the config (fixed seed) and cached on disk
(``--cache-dir``); their best checkpoints are the domain teachers. Per seed, from the same post-B
checkpoint: MOPD with the two teachers and GRPO on the add+sub mix, the same samples per step and
optimizer, greedy accuracy per domain on a fixed eval set (its standard error is printed) after every
step. A method *reaches* its target at the first step at which both domains are at >= 95% of their
teacher's score; a method that never gets there within its budget (``--steps``, ``--grpo-steps``) is
reported as ``reached=no`` and gives no step count, so no ratio.

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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import _mopd_toy as toy
from bench.plotting import save_plot

TARGET = toy.TARGET
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
            ax.set_xlabel("optimizer step (from the post-B checkpoint)")
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


# --task: ToyConfig presets. arith (the default, measured first): add vs sub. digits: reverse vs sort a
# 4-digit string, answers of 4 tokens + EOS with an exact-match reward; stage B is 200 SFT steps on sort
# (post-B rev ~0.5: with the arith stages sort barely erodes rev). Results: docs/mopd.md, "multi-token answers".
TASKS = {"arith": {},
         "digits": {"task": "digits", "digits": 4, "digit_ops": "rev,sort", "max_new_tokens": 5,
                    "sft_steps": (100, 200), "rl_steps": (10, 10)}}
SMOKE = {"base_sft_steps": 20, "sft_pairs": 640, "sft_steps": (10, 5), "rl_steps": (2, 2), "stage_eval_every": 1, "eval_size": 32,
         "groups": 4, "group_size": 4, "num_layers": 1}


def parse_overrides(items: list[str], base: dict | None = None) -> toy.ToyConfig:
    """``key=value`` items as ``ToyConfig`` fields (tuples as ``a,b``); an unknown key is an error naming the valid ones."""
    fields = toy.ToyConfig.__dataclass_fields__
    kw = dict(base or {})
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"mopd_vs_grpo: bad override {item!r}; expected key=value with key one of {sorted(fields)}")
        default = getattr(toy.ToyConfig(), key)
        kw[key] = (tuple(int(v) for v in value.split(",")) if isinstance(default, tuple)
                   else type(default)(value))
    return toy.ToyConfig(**kw)


def eval_line(ckpt: dict, cfg: toy.ToyConfig) -> str:
    """The teachers' and the post-B checkpoint's eval scores with their binomial standard errors."""
    n = cfg.eval_size
    part = lambda scores: " ".join(f"{d}={a:.3f} (se {toy.standard_error(a, n):.4f})" for d, a in scores.items())
    return (f"eval: {n} fixed prompts per domain, standard error <= {toy.standard_error(0.5, n):.4f} at any accuracy; "
            f"teachers {part(ckpt['teachers'])}; post-B {part(ckpt['post_b_eval'])}")


def run_seed(seed: int, ckpt: dict, cfg: toy.ToyConfig, args: argparse.Namespace) -> dict:
    t0 = time.time()
    curves = {METHODS[0]: toy.run_method("mopd", ckpt, cfg, seed, args.steps),
              METHODS[1]: toy.run_method("grpo_mix", ckpt, cfg, seed, args.grpo_steps)}
    return {"teachers": ckpt["teachers"], "curves": curves, "budget": {"mopd": args.steps, "grpo_mix": args.grpo_steps},
            "post_b_eval": ckpt["post_b_eval"], "wall_s": time.time() - t0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None,
                        help="where the plot and the JSON results go (default docs/img; --smoke: none written)")
    parser.add_argument("--steps", type=int, default=150, help="step budget of MOPD")
    parser.add_argument("--grpo-steps", type=int, default=450, help="step budget of GRPO on the mixed data")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the two comparison runs")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/relaxrl"),
                        help="the teachers and the post-B checkpoint are cached here, by config and code")
    parser.add_argument("--smoke", action="store_true", help="a tiny config and budgets (seconds), no plot by default")
    parser.add_argument("--task", choices=sorted(TASKS), default="arith",
                        help="the domain pair: arith (add vs sub, the default) or digits (reverse vs sort 4 digits)")
    parser.add_argument("--report", default=None, help="no runs: summarise and plot this results JSON again")
    parser.add_argument("overrides", nargs="*", help="ToyConfig fields, key=value (bench/_mopd_toy.py)")
    args = parser.parse_args(argv)
    if args.out is None and not args.smoke:
        args.out = "docs/img"
    if args.report:
        return report(load_runs(args.report), args.out)
    if args.smoke:
        args.steps, args.grpo_steps = min(args.steps, 3), min(args.grpo_steps, 3)
    cfg = parse_overrides(args.overrides, {**TASKS[args.task], **(SMOKE if args.smoke else {})})
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    ckpt = toy.build_checkpoints(cfg, args.cache_dir)
    print(eval_line(ckpt, cfg), flush=True)
    runs = {seed: run_seed(seed, ckpt, cfg, args) for seed in seeds}
    print(f"wall_s={time.time() - t0:.0f}")
    return report(runs, args.out, extra={"config": asdict(cfg), "stages": ckpt["stages"],
                                          "build_s": ckpt["build_s"], "wall_s": time.time() - t0})


if __name__ == "__main__":
    main()
