"""The staleness queue's own ceiling: samples/s and p99 put/get latency through the real Ray actor.

N producer actors (1, 4, 16) admit groups and put them as the driver's producers do: up to
``--groups-per-request`` groups admitted in one call and put in one call (the driver's default is
8 for the quickstart; 1 shows the cost per group). One consumer takes batches and bumps the policy
version after each batch, as the trainer does. Samples carry 64- or 1,024-token responses
(with per-token log-probs and loss mask). Memory per queued sample is measured in-process with
tracemalloc.

    python bench/queue_scale.py            # full (~2 min on 2 cores)
    python bench/queue_scale.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import tracemalloc

import common  # noqa: F401  (environment and import path)
import numpy as np
import ray

from relaxrl.queue import QueueActor, StalenessQueue, group_name
from relaxrl.sample import Packed, Sample

GROUP = 8
GROUPS_PER_STEP = 8
STALENESS = 2


def make_group(seq: int, tokens: int) -> list[Sample]:
    # The policy version a producer in step with the trainer would report: never staler than allowed.
    version = max(0, seq // GROUPS_PER_STEP - STALENESS)
    # As the rollout builds them, a group's samples share their prompt and timings (there: a request's).
    prompt, timings = list(range(16)), {"gen_start": 1.0, "gen_end": 2.0, "reward_start": 2.0, "reward_end": 3.0}
    return [
        Sample(uid=f"{group_name(seq)}/{k}", group_id=group_name(seq), index=k, prompt_ids=prompt,
               response_ids=[7] * tokens, loss_mask=[1] * tokens, behaviour_logprobs=[-0.5] * tokens,
               policy_version=version, reward=1.0, response_text="x" * 8, timings=timings)
        for k in range(GROUP)
    ]


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, queue, tokens: int, per_request: int) -> None:
        self.queue, self.tokens, self.per_request = queue, tokens, per_request

    def ready(self) -> bool:
        return True

    async def run(self) -> list[float]:
        """Admit and put requests of groups until the queue closes; returns put latencies (s)."""
        latencies = []
        while (admitted := await self.queue.admit_many.remote(self.per_request)) is not None:
            samples = [s for seq, _ in admitted for s in make_group(seq, self.tokens)]
            t0 = time.perf_counter()
            try:
                await self.queue.put.remote(Packed(samples))  # the wire form the roles send
            except ray.exceptions.RayTaskError:  # admitted just before close: the groups stay in flight
                break
            latencies.append(time.perf_counter() - t0)
        return latencies


async def consume(queue, steps: int) -> tuple[float, list[float], int]:
    latencies, samples = [], 0
    t_start = None
    for version in range(1, steps + 1):  # the trainer's two queue calls per step
        t0 = time.perf_counter()
        batch = await queue.get_batch.remote(GROUPS_PER_STEP, 120.0)
        latencies.append(time.perf_counter() - t0)
        if t_start is None:  # start the clock once the pipeline is full
            t_start = time.perf_counter()
        else:
            samples += len(batch)
        await queue.set_version.remote(version)
    return time.perf_counter() - t_start, latencies, samples


def measure(producers: int, tokens: int, steps: int, per_request: int) -> dict:
    # Imported (not run as a script), this module is not on the workers' path: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    queue = ray.remote(QueueActor).options(num_cpus=0, max_concurrency=1000).remote(
        groups_per_step=GROUPS_PER_STEP, group_size=GROUP, max_staleness=STALENESS,
        required_fields=("response_ids", "behaviour_logprobs", "reward"))
    actors = [Producer.remote(queue, tokens, per_request) for _ in range(producers)]
    ray.get([a.ready.remote() for a in [*actors]])  # worker start-up is not queue throughput
    runs = [a.run.remote() for a in actors]
    wall, get_lat, samples = asyncio.run(consume(queue, steps))
    ray.get(queue.close.remote())
    put_lat = [x for lat in ray.get(runs) for x in lat]
    ray.get(queue.check_accounting.remote())
    for a in [*actors, queue]:
        ray.kill(a)
    return {
        "samples_per_s": samples / wall,
        "put_p99_ms": float(np.percentile(put_lat, 99) * 1000),
        "get_p99_ms": float(np.percentile(get_lat[1:], 99) * 1000),
    }


def bytes_per_queued_sample(tokens: int, groups: int = 64) -> float:
    q = StalenessQueue(groups_per_step=groups, group_size=GROUP, max_staleness=0)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(groups):
        q.put(make_group(q.admit(), tokens))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / (groups * GROUP)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="consumer steps per measurement")
    p.add_argument("--producers", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--groups-per-request", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.producers, args.tokens, args.groups_per_request = 5, [1, 4], [64], [1, 8]
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    results = {}
    for tokens in args.tokens:
        print(f"tokens={tokens}: {bytes_per_queued_sample(tokens) / 1024:.1f} KiB per queued sample")
        for k in args.groups_per_request:
            for n in args.producers:
                r = results[(n, tokens, k)] = measure(n, tokens, args.steps, k)
                print(f"producers={n} tokens={tokens} groups_per_request={k} samples_per_s={r['samples_per_s']:.0f} "
                      f"put_p99_ms={r['put_p99_ms']:.2f} get_p99_ms={r['get_p99_ms']:.2f}", flush=True)
    n, tokens, k = max(args.producers), min(args.tokens), max(args.groups_per_request)
    r = results[(n, tokens, k)]
    print(f"queue_scale: samples_per_s={r['samples_per_s']:.0f} p99_ms={max(r['put_p99_ms'], r['get_p99_ms']):.2f} "
          f"producers={n} tokens={tokens} groups_per_request={k}")


if __name__ == "__main__":
    main()
