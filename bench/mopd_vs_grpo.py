"""MOPD vs GRPO on mixed data after sequential training forgets a domain (tiny model, CPU, fixed seeds).

    python bench/mopd_vs_grpo.py [--out docs/img] [--steps 60] [--grpo-steps 120] [Hydra overrides ...]

Runs the ``mopd_toy`` pipeline (GRPO on add -> GRPO on sub -> MOPD over add and sub, teachers from the
checkpoint registry) plus a fourth stage, GRPO on the mixed add+sub data, started from the same post-sub
checkpoint as MOPD. Both comparison stages are evaluated (greedy, per domain) after every step.
A method's step count is the first step at which *both* domains reach 95% of their teacher's registered
score; a method that never gets there within its budget (``--steps``, ``--grpo-steps``) is reported with
the budget (``(budget,not_reached)``), so the ratio is then a bound, not a measurement.
Writes ``mopd_vs_grpo.png`` (per-domain score vs step) and ``mopd_vs_grpo.json`` to ``--out``; the last
line is ``mopd_vs_grpo: mopd_steps=M grpo_mix_steps=G step_ratio=R domain_a=... domain_b=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 0.95


def steps_to_target(history: list[dict], targets: dict[str, float]) -> int | None:
    """First evaluated step at which every domain's accuracy is >= its target (None: never)."""
    for row in history:
        if all(row["domains"][d]["accuracy"] >= t for d, t in targets.items()):
            return row["step"]
    return None


def read_eval(stage_dir: str) -> list[dict]:
    with open(os.path.join(stage_dir, "eval.jsonl")) as f:
        return [json.loads(line) for line in f]


def plot(curves: dict[str, list[dict]], targets: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(targets)
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), sharey=True)
    for ax, d in zip(axes, domains):
        for (label, hist), style in zip(curves.items(), ("-o", "-s")):
            ax.plot([r["step"] for r in hist], [r["domains"][d]["accuracy"] for r in hist], style, ms=3, label=label)
        ax.axhline(targets[d], color="grey", ls="--", lw=1, label=f"95% of teacher ({targets[d]:.2f})")
        ax.set_title(f"domain {d}")
        ax.set_xlabel("optimizer step (from the post-sub checkpoint)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("greedy eval accuracy")
    axes[0].legend(loc="best", fontsize=8, framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/img", help="where the plot and the JSON results go")
    parser.add_argument("--steps", type=int, default=60, help="step budget of MOPD")
    parser.add_argument("--grpo-steps", type=int, default=120, help="step budget of GRPO on the mixed data")
    parser.add_argument("--run-dir", default=None, help="pipeline run directory (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to +experiment=mopd_toy")
    args = parser.parse_args()
    try:  # fail before the run, not after it
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("bench/mopd_vs_grpo.py plots with matplotlib: pip install -e '.[bench]'") from None

    from hydra import compose, initialize_config_module

    import relaxrl.config  # noqa: F401  (registers the schemas)
    from relaxrl.pipeline.config import StageConfig
    from relaxrl.pipeline.runner import run_pipeline

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="mopd_vs_grpo-")
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[
            "+experiment=mopd_toy", f"run_dir={run_dir}", "logger.progress=false", "ray.num_cpus=2",
            *args.overrides,
        ])
    mopd = cfg.pipeline.stages[-1]
    mopd.steps, mopd.eval_every = args.steps, 1
    post_b = cfg.pipeline.stages[-2].name  # both methods start from the post-B checkpoint
    cfg.pipeline.stages.append(StageConfig(name="grpo_mix", algorithm={"name": "grpo"}, init_from=post_b,
                                           steps=args.grpo_steps, eval_every=1))
    t0 = time.time()
    result = run_pipeline(cfg)
    wall = time.time() - t0

    teachers = result["teachers"]
    targets = {d: TARGET * s for d, s in teachers.items()}
    stages = result["stages"]
    curves = {"MOPD": read_eval(stages[mopd.name]["run_dir"]),
              "GRPO on mixed data": read_eval(stages["grpo_mix"]["run_dir"])}
    reach = {label: steps_to_target(h, targets) for label, h in curves.items()}
    m, g = reach["MOPD"], reach["GRPO on mixed data"]
    m_steps, g_steps = (m if m is not None else args.steps), (g if g is not None else args.grpo_steps)
    ratio = m_steps / max(g_steps, 1)
    seq = {name: stages[name]["eval"] for name in stages}
    os.makedirs(args.out, exist_ok=True)
    plot(curves, targets, os.path.join(args.out, "mopd_vs_grpo.png"))
    with open(os.path.join(args.out, "mopd_vs_grpo.json"), "w") as f:
        json.dump({"teachers": teachers, "targets": targets, "stage_final_eval": seq, "reach": reach,
                   "budget": {"mopd": args.steps, "grpo_mix": args.grpo_steps}, "curves": curves, "wall_s": wall},
                  f, indent=1)

    for name, ev in seq.items():
        print(f"stage {name:10s} " + " ".join(f"{d}={v['accuracy']:.3f}" for d, v in ev.items()))
    print(f"teachers: {teachers}; targets (95%): { {d: round(t, 3) for d, t in targets.items()} }; wall_s={wall:.0f}")
    for label, hist in curves.items():
        last = hist[-1]["domains"]
        print(f"{label}: reached={'yes' if reach[label] is not None else 'no'} at step "
              f"{reach[label] if reach[label] is not None else '-'}; at step {hist[-1]['step']}: "
              + " ".join(f"{d}={v['accuracy']:.3f}" for d, v in last.items()))
    a, b = sorted(targets)
    fa, fb = curves["MOPD"][-1]["domains"][a]["accuracy"], curves["MOPD"][-1]["domains"][b]["accuracy"]
    print(f"mopd_vs_grpo: mopd_steps={m_steps}{'' if m is not None else '(budget,not_reached)'} "
          f"grpo_mix_steps={g_steps}{'' if g is not None else '(budget,not_reached)'} step_ratio={ratio:.2f} "
          f"domain_a={a}:{fa:.3f}/{teachers[a]:.3f} domain_b={b}:{fb:.3f}/{teachers[b]:.3f}", flush=True)


if __name__ == "__main__":
    main()
