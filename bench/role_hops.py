"""What one hop between roles costs, and the floor the hops put under a synchronous step.

Measured from inside a Serve replica, as the roles send things (one request at a time):
    empty_hop    a Ray actor call carrying nothing, one way (the weight store's notice)
    actor_hop    a request's samples to a plain Ray actor (reward → queue, queue → trainer)
    serve_hop    a request's samples through a Serve handle to another replica (rollout → reward)
    weights_hop  ray.put of a weight payload, its ref sent on, and the receiver's fetch
The samples are a rewarded 256-sample request (``relaxrl.sample.Packed``, 16 groups of 16,
16-token responses), the payload the size of the quickstart's LoRA adapter (1.2 MB). A
``max_staleness=0`` step makes each of these at least once in turn (see ``bench/critical_path.py``):
    path_floor = weights_hop + empty_hop + serve_hop + 2 * actor_hop
which no work of the roles' own can hide.

Both of Serve's thread layouts are measured in alternating rounds in one Ray session (the machine's
drift hits them alike): Serve's default (a replica's code on a thread and event loop of its own,
each handle's router on another), which RelaxRL keeps, and both on the replica's main loop
(``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``, ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0``).

    python bench/role_hops.py            # ~1 min on 2 cores
    python bench/role_hops.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import asyncio
import time
from statistics import median

import common  # noqa: F401  (environment and import path)
import numpy as np
import ray
from ray import serve
from wire_format import batch

from relaxrl.sample import Packed

SINK, NAMESPACE = "role-hops-sink", "relaxrl-bench"
HOPS = ("empty_hop", "actor_hop", "serve_hop", "weights_hop")
# name: Serve's environment variables for the replicas; RelaxRL runs with Serve's default.
LAYOUTS = {
    "serve_default": {},
    "one_loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
}


def path_floor(ms: dict[str, float]) -> float:
    """Milliseconds of hops a synchronous step makes in turn (module docstring)."""
    return ms["weights_hop"] + ms["empty_hop"] + ms["serve_hop"] + 2 * ms["actor_hop"]


def app_names(layout: str) -> tuple[str, str]:
    """The Serve applications of one layout: its caller and its callee."""
    return f"caller-{layout}", f"callee-{layout}"


def hop_fields(ms: dict[str, float]) -> str:
    return " ".join(f"{h}_ms={v:.2f}" for h, v in ms.items()) + f" path_floor_ms={path_floor(ms):.1f}"


@ray.remote(num_cpus=0)
class Sink:
    """Stands in for the queue and the weight store: a plain async Ray actor."""

    async def put(self, samples: object, sent: float) -> float:
        return time.time() - sent

    async def fetch(self, ref: list, sent: float) -> float:
        await ref[0]
        return time.time() - sent


@serve.deployment(max_ongoing_requests=64)
class Callee:
    """Stands in for the reward role."""

    async def score(self, samples: list, sent: float) -> float:
        return time.time() - sent


@serve.deployment(max_ongoing_requests=64)
class Caller:
    """Stands in for a role sending on what it made, one request at a time."""

    def __init__(self, callee: str, samples: list, payload_mb: float) -> None:
        self.callee, self.sink = serve.get_app_handle(callee), ray.get_actor(SINK, namespace=NAMESPACE)
        self.samples = samples
        self.payload = np.zeros(int(payload_mb * 2**20) // 4, dtype=np.float32)

    async def go(self, calls: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {h: [] for h in HOPS}
        for _ in range(calls):
            out["empty_hop"].append(await self.sink.put.remote(None, time.time()))
            out["actor_hop"].append(await self.sink.put.remote(Packed(self.samples), time.time()))
            out["serve_hop"].append(await self.callee.score.remote(Packed(self.samples), time.time()))
            sent = time.time()
            out["weights_hop"].append(await self.sink.fetch.remote([ray.put(self.payload)], sent))
            await asyncio.sleep(0.01)
        return out


def deploy(samples: int, payload_mb: float) -> dict:
    """One caller/callee pair per layout, started together; returns the callers' handles by layout name."""
    made = Packed(batch(max(1, samples // 16), 16, 30, 16, shared=True))  # built here, sent as the roles send
    targets = []
    for name, env in LAYOUTS.items():
        opts = {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}},
                "graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1.0}  # nothing to drain
        caller, callee = app_names(name)
        targets += [serve.RunTarget(Callee.options(**opts).bind(), name=callee, route_prefix=None),
                    serve.RunTarget(Caller.options(**opts).bind(callee, made, payload_mb), name=caller,
                                    route_prefix=None)]
    handles = dict(zip((t.name for t in targets), serve.run_many(targets)))
    return {name: handles[app_names(name)[0]] for name in LAYOUTS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="alternations of the two layouts")
    p.add_argument("--calls", type=int, default=40, help="hops of each kind per layout and round")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--payload-mb", type=float, default=1.2)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.calls, args.samples = 1, 3, 32
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sink = Sink.options(name=SINK, namespace=NAMESPACE).remote()
    try:
        callers = deploy(args.samples, args.payload_mb)
        hops = {name: {h: [] for h in HOPS} for name in LAYOUTS}
        for _ in range(args.rounds):
            for name, caller in callers.items():
                for h, seconds in caller.go.remote(args.calls + 1).result().items():
                    hops[name][h] += seconds[1:]  # the first call sets up connections
        ms = {name: {h: 1000 * median(v) for h, v in by_hop.items()} for name, by_hop in hops.items()}
        for name, m in ms.items():
            print(f"layout={name}: {hop_fields(m)} ({len(hops[name]['empty_hop'])} hops each)")
        ours, other = ms["serve_default"], ms["one_loop"]
        print(f"role_hops: {hop_fields(ours)} one_loop_serve_ratio={other['serve_hop'] / ours['serve_hop']:.3f} "
              f"one_loop_actor_ratio={other['actor_hop'] / ours['actor_hop']:.3f} samples={args.samples}")
    finally:
        apps = [app for name in LAYOUTS for app in app_names(name)]
        for app in apps:  # the controller deletes them together: wait for the last one only
            serve.delete(app, _blocking=app == apps[-1])
        ray.kill(sink)
        if started:
            ray.shutdown()


if __name__ == "__main__":
    main()
