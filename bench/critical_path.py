"""The synchronous step's critical path, hop by hop: where a ``max_staleness=0`` step spends the
time that is not generation, reward or training (what ``bench/overhead.py`` counts as overhead).

One run of the overhead bench's work (``+experiment=quickstart``, 16 groups of 16 sent as one
request per step); from the run's ``stage_intervals.json`` each step is cut into, in order:

    publish → rollout  the trainer's end to the rollout starting to load (copy out, ray.put, the
                       weight store's notice to the waiting request)
    load               the rollout fetching and loading the new weights
    generate
    → reward           the samples built and handed to the reward role (one Serve call)
    reward
    → trainer          reward → queue → trainer, and the trainer's collate
    train

Medians over the steady steps (the first 10% are start-up), with the 10th and 90th percentiles:
one run, so compare hops with each other, not with another day's run.

    python bench/critical_path.py            # ~1 min on 2 cores
    python bench/critical_path.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
from statistics import median
from typing import Sequence

from common import REPORTED_SETTINGS, bench_dir, compose, run

from relaxrl.driver import STAGE_INTERVALS

Interval = tuple[float, float]
HOPS = ("publish_to_rollout", "load", "generate", "to_reward", "reward", "to_trainer", "train")


def next_after(intervals: Sequence[Interval], t: float) -> Interval:
    """The first interval starting at or after ``t`` (intervals sorted by start)."""
    i = bisect.bisect_left(intervals, (t - 1e-6,))
    if i == len(intervals):
        raise ValueError(f"no interval starts after {t}")
    return intervals[i]


def hops_of_step(iv: dict[str, list[Interval]], k: int) -> dict[str, float]:
    """Seconds of each hop from the end of training step ``k`` to the end of step ``k + 1``."""
    train_end = iv["train"][k][1]
    load = next_after(iv["weights"], train_end)
    gen = next_after(iv["gen"], load[1])
    reward = next_after(iv["reward"], gen[1])
    train = iv["train"][k + 1]
    return {"publish_to_rollout": load[0] - train_end, "load": load[1] - load[0], "generate": gen[1] - gen[0],
            "to_reward": reward[0] - gen[1], "reward": reward[1] - reward[0], "to_trainer": train[0] - reward[1],
            "train": train[1] - train[0]}


def critical_path(iv: dict[str, list[Interval]], skip: int) -> dict[str, list[float]]:
    """Each hop's milliseconds for every steady step of a synchronous run."""
    for stage in ("train", "weights", "gen", "reward"):
        if not iv.get(stage):
            raise ValueError(f"the run recorded no {stage!r} intervals: is it a synchronous run with a weight store?")
    out: dict[str, list[float]] = {h: [] for h in HOPS}
    for k in range(skip, len(iv["train"]) - 1):
        for hop, s in hops_of_step(iv, k).items():
            out[hop].append(1000 * s)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("override", nargs="*", default=["rollout.group_size=16", "rollout.groups_per_step=16",
                                                    "rollout.batch_max_groups=16", "rollout.max_new_tokens=16"],
                   help="Hydra overrides defining the work (default: the overhead bench's)")
    args = p.parse_args(argv)
    steps = 6 if args.smoke else args.steps
    cfg = compose("+experiment=quickstart", "rollout.max_staleness=0", f"trainer.steps={steps}",
                  "trainer.save_final=false", "logger.progress=false", *REPORTED_SETTINGS, *args.override,
                  f"run_dir={bench_dir('critical-path')}")
    summary, _ = run(cfg)
    with open(os.path.join(summary["run_dir"], STAGE_INTERVALS)) as f:
        iv = {k: sorted(map(tuple, v)) for k, v in json.load(f).items()}
    hops = critical_path(iv, skip=max(1, steps // 10))
    for hop, ms in hops.items():
        print(f"{hop:20s} median={median(ms):7.1f} ms  p10={pct(ms, 0.1):7.1f}  p90={pct(ms, 0.9):7.1f}")
    step = [sum(v) for v in zip(*hops.values())]
    handoffs = [a + b + c for a, b, c in zip(hops["publish_to_rollout"], hops["to_reward"], hops["to_trainer"])]
    print(f"critical_path: step_ms={median(step):.1f} handoff_ms={median(handoffs):.1f} "
          + " ".join(f"{h}_ms={median(v):.1f}" for h, v in hops.items()))


if __name__ == "__main__":
    main()
