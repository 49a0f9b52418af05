"""What a request's samples cost to pickle and unpickle on each hop between roles: the plain list
as the rollout built it until 2026-12-01 (per-sample copies of the timings and the prompt), the
same list with those shared, and what the roles send now (``relaxrl.sample.Packed`` of it: a
call's samples share one timings dict, a group's one prompt list). The variants alternate,
``--repeats`` rounds, so the machine's drift hits them alike; medians.

    python bench/wire_format.py            # seconds
    python bench/wire_format.py --smoke
"""

from __future__ import annotations

import argparse
import pickle
import random
import time
from statistics import median

from relaxrl.sample import Packed, Sample

TIMINGS = {"weights_start": 0.5, "weights_end": 0.6, "gen_start": 1.0, "gen_end": 2.0, "reward_start": 2.0,
           "reward_end": 3.0}


def batch(groups: int, group_size: int, prompt_len: int, max_new: int, shared: bool, seed: int = 0) -> list[Sample]:
    """A rewarded request's samples; ``shared``: as the rollout builds them now."""
    rng, out, timings = random.Random(seed), [], dict(TIMINGS)
    for g in range(groups):
        prompt = [rng.randrange(64) for _ in range(prompt_len)]
        for k in range(group_size):
            n = rng.randint(1, max_new)
            out.append(Sample(uid=f"g{g}/{k}", group_id=f"g{g}", index=k,
                              prompt_ids=prompt if shared else list(prompt), env="arithmetic", answer="7",
                              response_ids=[rng.randrange(64) for _ in range(n)], loss_mask=[1] * n,
                              behaviour_logprobs=[-rng.random() for _ in range(n)], policy_version=3,
                              finish_reason="stop", response_text="12", reward=1.0, reward_info={"parsed": 1.0},
                              timings=timings if shared else dict(timings)))
    return out


def measure(variants: dict, repeats: int) -> dict[str, tuple[int, float, float]]:
    """Bytes, median dumps ms and median loads ms of each variant, timed in alternation."""
    blobs = {k: pickle.dumps(v, protocol=5) for k, v in variants.items()}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, v in variants.items():
            t0 = time.perf_counter()
            pickle.dumps(v, protocol=5)
            t1 = time.perf_counter()
            pickle.loads(blobs[k])
            times[k].append((1000 * (t1 - t0), 1000 * (time.perf_counter() - t1)))
    return {k: (len(blobs[k]), median(d for d, _ in t), median(lo for _, lo in t)) for k, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.groups, args.repeats = 2, 3
    shape = (args.groups, args.group_size, args.prompt_len, args.max_new_tokens)
    variants = {"list_unshared": batch(*shape, shared=False), "list_shared": batch(*shape, shared=True),
                "packed_shared": Packed(batch(*shape, shared=True))}
    r = measure(variants, args.repeats)
    for k, (nbytes, dumps, loads) in r.items():
        print(f"{k:14s} bytes={nbytes} dumps_ms={dumps:.2f} loads_ms={loads:.2f} both_ms={dumps + loads:.2f}")
    before, now = sum(r["list_unshared"][1:]), sum(r["packed_shared"][1:])
    print(f"wire_format: samples={len(variants['list_unshared'])} before_ms={before:.2f} now_ms={now:.2f} "
          f"ratio={now / before:.3f} bytes_ratio={r['packed_shared'][0] / r['list_unshared'][0]:.3f}")


if __name__ == "__main__":
    main()
