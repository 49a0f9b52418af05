"""Asynchronous speed-up against its limit, measured side by side in one run.

The same GRPO experiment (the quickstart's tiny model and task with 16 groups of 16 responses per
step, CPU, fixed seeds) runs with ``max_staleness`` 0, 1 and 2, repeated ``--repeats`` times
interleaved (one seed per repeat; staleness 1 only in the first ``--other-repeats``). The reward
role waits ``--latency-ms`` per request (the groups of one request are verified concurrently): a
*simulated verifier latency* standing in for a sandboxed code run, tool call or judge model
(I/O-bound: wall time, no CPU). By default it is calibrated so that generation + reward take about
as long as training + weight publication. The trainer is pinned to one CPU (``trainer.cpus``;
``--trainer-cpu -1`` turns that off), and in the asynchronous runs the other roles keep off it.

From each synchronous run's own stage measurements, the overlap limit is
``(gen + reward + train + weight sync per step) / (largest of them)``; efficiency is the measured
async/sync step-rate ratio divided by that limit (medians over the repeats). Sample efficiency:
mean reward (over seeds) of the policy trained on the same number of samples, against the sync
runs of the same seeds.

    python bench/async_speedup.py            # full (9-17 min on 2 cores, by the machine's speed)
    python bench/async_speedup.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
from collections import Counter
from statistics import fmean, median

from common import REPORTED_SETTINGS, RESULTS_DIR, bench_dir, compose, fmt, run, steady_steps_per_s, window_mean



def overrides(args: argparse.Namespace, staleness: int, latency_s: float, steps: int) -> list[str]:
    return [
        "+experiment=quickstart",
        f"run_dir={bench_dir(f's{staleness}')}",
        f"rollout.max_staleness={staleness}",
        f"rollout.group_size={args.group_size}",
        f"rollout.groups_per_step={args.groups_per_step}",
        # One request (one generate call, one reward call, one queue put) per step's groups: on 2
        # cores every role call costs CPU the trainer competes for (measured 279 vs 324 ms/step at
        # max_staleness=2 against two requests of 8 groups).
        f"rollout.batch_max_groups={args.groups_per_step}",
        f"reward.simulated_latency_s={latency_s}",
        f"trainer.steps={steps}",
        *([f"trainer.cpus=[{args.trainer_cpu}]"] if args.trainer_cpu >= 0 else []),
        "trainer.save_final=false",
        "logger.progress=false",
        *REPORTED_SETTINGS,
        *args.override,
    ]


def sync_stage_times(summary: dict) -> dict[str, float]:
    """Seconds per step of each pipeline stage; weight sync is publication plus the rollout's load."""
    st = summary["stage_s_per_step"]
    return {
        "gen": st.get("gen", 0.0),
        "reward": st.get("reward", 0.0),
        "train": st.get("train", 0.0),
        "sync": st.get("publish", 0.0) + st.get("weights", 0.0),
    }


def overlap_limit(stages: dict[str, float]) -> float:
    return sum(stages.values()) / max(stages.values())


def reward_by_policy(records: list[dict]) -> list[float]:
    """Batch reward by the version of the policy that generated the batch (its samples' mean policy
    version, rounded); a version no batch came from (a mixed batch rounded to its neighbour) repeats
    the one before."""
    by_version: dict[int, list[float]] = {}
    for r in records:
        by_version.setdefault(round(r["version"] - 1 - r["staleness_mean"]), []).append(r["reward_mean"])
    out: list[float] = []
    for v in range(max(by_version) + 1):
        out.append(fmean(by_version[v]) if v in by_version else out[-1])
    return out


def mean_curves(curves: list[list[float]]) -> list[float]:
    """Pointwise mean over runs, as long as the shortest."""
    return [fmean(c[i] for c in curves) for i in range(min(len(c) for c in curves))]


def calibrate_latency(args: argparse.Namespace) -> float:
    """Reward latency making gen + reward ≈ train + sync, from a short synchronous run."""
    summary, _ = run(compose(*overrides(args, 0, 0.0, args.calibration_steps), f"seed={args.seed}"))
    st = sync_stage_times(summary)
    return max(0.0, st["train"] + st["sync"] - st["gen"] - st["reward"])


def plot(results: dict[int, tuple[dict, list[dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for s, (summary, recs) in results.items():
        rewards = [r["reward_mean"] for r in recs]
        width = max(1, len(recs) // 20)
        smooth = [window_mean(rewards, i + 1, width) for i in range(len(recs))]
        ax1.plot([r["wall_s"] for r in recs], smooth, label=f"max_staleness={s}")
        hist = {int(k): v for k, v in summary["staleness_hist"].items()}
        xs = sorted(hist)
        ax2.bar([x + 0.25 * (s - 1) for x in xs], [hist[x] / sum(hist.values()) for x in xs], width=0.25,
                label=f"max_staleness={s}")
    ax1.set_xlabel("wall time (s)")
    ax1.set_ylabel(f"train reward (moving mean)")
    ax1.legend()
    ax2.set_xlabel("staleness of trained samples (versions)")
    ax2.set_ylabel("fraction of trained samples")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--groups-per-step", type=int, default=16)
    p.add_argument("--trainer-cpu", type=int, default=0,
                   help="pin the trainer to this CPU and the other roles off it (trainer.cpus); -1: no pinning")
    p.add_argument("--latency-ms", type=float, default=None, help="simulated verifier latency; default: calibrated")
    p.add_argument("--async-staleness", type=int, default=2, choices=(1, 2),
                   help="the run reported as 'async' (default 2: the quickstart's max_staleness)")
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2], help="runs; 0 is the baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (seeds seed, seed+1, ...)")
    p.add_argument("--other-repeats", type=int, default=1,
                   help="repeats that also run the staleness settings other than 0 and --async-staleness "
                        "(they are reported, not part of the summary line; fewer keeps the bench under 20 min)")
    p.add_argument("--smoke", action="store_true", help="a few steps, no plot: checks the bench runs")
    p.add_argument("--plot", default=f"{RESULTS_DIR}/async_speedup.png")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.calibration_steps, args.plot, args.repeats = 4, 3, None, 1
    if 0 not in args.staleness or args.async_staleness not in args.staleness:
        p.error(f"--staleness must include 0 and --async-staleness={args.async_staleness}")

    latency = args.latency_ms / 1000 if args.latency_ms is not None else calibrate_latency(args)
    print(f"simulated verifier latency: {latency * 1000:.1f} ms per request "
          f"({'given' if args.latency_ms is not None else 'calibrated: gen + reward ~ train + sync'})")
    # Repeats interleave the staleness settings (0, 1, 2, 0, 1, 2, ...) with one seed per repeat, so
    # each ratio compares runs taken minutes apart; the medians damp this machine's noise.
    results: dict[int, list[tuple[dict, list[dict]]]] = {s: [] for s in args.staleness}
    for rep in range(args.repeats):
        for s in args.staleness:
            if s not in (0, args.async_staleness) and rep >= args.other_repeats:
                continue
            results[s].append(run(compose(*overrides(args, s, latency, args.steps), f"seed={args.seed + rep}")))

    a = args.async_staleness
    rates = {s: [steady_steps_per_s(recs) * 3600 for _, recs in runs] for s, runs in results.items()}
    limits, step_limits, ratios = [], [], []
    for rep in range(args.repeats):
        stages = sync_stage_times(results[0][rep][0])
        limits.append(overlap_limit(stages))
        # The synchronous step also holds the hand-offs between stages, which the stage sum leaves
        # out and an overlapped run hides too: its whole step over the largest stage bounds the ratio.
        step_limits.append(3600 / rates[0][rep] / max(stages.values()))
        ratios.append(rates[a][rep] / rates[0][rep])
        print(f"repeat {rep} (seed {args.seed + rep}): sync stage ms per step: "
              + fmt({k: v * 1000 for k, v in stages.items()}) + f" limit={limits[-1]:.3f} "
              + f"step_limit={step_limits[-1]:.3f} "
              + " ".join(f"s{s}_steps_per_h={rates[s][rep]:.0f}" for s in args.staleness if rep < len(rates[s]))
              + f" ratio={ratios[-1]:.3f} efficiency={ratios[-1] / limits[-1]:.3f}")
    for s, runs in results.items():
        hist = sum((Counter(summary["staleness_hist"]) for summary, _ in runs), Counter())
        print(f"max_staleness={s}: steps_per_h={median(rates[s]):.0f} (median of {len(runs)}) "
              f"ratio_vs_sync={median(rates[s]) / median(rates[0]):.3f} staleness_hist={dict(sorted(hist.items()))} "
              f"dropped={sum(summary['dropped'] for summary, _ in runs)}")

    # Sample efficiency: every step trains the same number of samples. A step's batch reward measures
    # the policy that generated the batch, which in an async run is max_staleness versions older
    # than the one being trained, so the curves are compared by that generating policy: the reward
    # of the policy made from N trained samples, sync vs async. The lagging by-step view is printed too.
    per_step = args.group_size * args.groups_per_step
    width = max(1, args.steps // 5)  # a fifth of the run
    by_step = {s: mean_curves([[r["reward_mean"] for r in recs] for _, recs in runs]) for s, runs in results.items()}
    policy_curves = {s: [reward_by_policy(recs) for _, recs in runs] for s, runs in results.items()}
    by_policy = {s: mean_curves(curves) for s, curves in policy_curves.items()}
    common = min(len(c) for c in by_policy.values())  # policy versions every run has a batch from
    for frac in (0.25, 0.5, 0.75, 1.0):
        end = max(1, int(common * frac))
        print(f"policy trained on {end * per_step} samples: " + " ".join(
            f"reward_s{s}={window_mean(by_policy[s], end, width):.3f}" for s in args.staleness)
            + " | batch at step " + " ".join(
            f"s{s}={window_mean(by_step[s], end, width):.3f}" for s in args.staleness))
    final = {s: window_mean(by_policy[s], common, width) for s in args.staleness}
    # Each async setting against the sync runs of its own seeds (staleness 1 may have fewer).
    sync_same = {s: window_mean(mean_curves(policy_curves[0][:len(curves)]), common, width)
                 for s, curves in policy_curves.items()}
    print(f"sample_efficiency: policies trained on {common * per_step} samples, window {width} versions, "
          f"mean over seeds: sync_reward={final[0]:.3f} ({len(results[0])} seeds) " + " ".join(
              f"s{s}_reward={final[s]:.3f} ({len(results[s])} seeds) diff_s{s}={final[s] - sync_same[s]:+.3f}"
              for s in args.staleness if s))

    if args.plot:
        try:
            plot({s: runs[0] for s, runs in results.items()}, args.plot)
            print(f"plot: {args.plot} (seed {args.seed})")
        except ImportError as e:  # the numbers stand without it
            print(f"plot skipped: {e} (pip install -e '.[bench]')")
    print(f"limit counting the synchronous hand-offs (sync step / largest stage): {median(step_limits):.3f}, "
          f"efficiency against it {median(ratios) / median(step_limits):.3f}")
    print(f"async_speedup: sync_steps_per_h={median(rates[0]):.0f} async_steps_per_h={median(rates[a]):.0f} "
          f"ratio={median(ratios):.3f} limit={median(limits):.3f} efficiency={median(ratios) / median(limits):.3f}")


if __name__ == "__main__":
    main()
