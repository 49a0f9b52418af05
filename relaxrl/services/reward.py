"""Reward role: runs the env's verifier on each response, guarding against errors and hangs."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional, Sequence, Union

from ray import serve

from relaxrl.envs.base import Task
from relaxrl.envs.guarded import task_of
from relaxrl.sample import Sample
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import keep_off_cpus, quiet_replica_logs


@serve.deployment(max_ongoing_requests=64)
class Reward:
    def __init__(self, env: dict, *, timeout_s: float = 10.0, max_workers: int = 8,
                 on_error: str = "drop", error_reward: float = 0.0, simulated_latency_s: float = 0.0,
                 hang_timeout_s: float = 600.0, avoid_cpus: Sequence[int] = ()) -> None:
        from relaxrl.envs.guarded import GuardedVerifier
        from relaxrl.envs.registry import make_env
        from relaxrl.faults import RequestWatch

        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)  # the trainer's CPUs (trainer.cpus)
        self.env = make_env(**env)
        self.simulated_latency_s = simulated_latency_s
        self.watch = RequestWatch(hang_timeout_s)  # a verifier stuck this long makes the replica unhealthy
        self.guard = GuardedVerifier(self.env.verify, timeout_s=timeout_s, max_workers=max_workers,
                                     on_error=on_error, error_reward=error_reward, track=self.watch.wrap)
        self.forwarder = Forwarder()

    async def score(self, samples: list[Sample], tasks: Union[Task, dict[str, Task]],
                    route: Optional[Route] = None) -> Any:
        """Samples with ``reward`` set; a failed verification leaves it None (or error_reward). With a
        ``route`` they go on to its next stop (see ``Rollout.generate``).

        ``tasks``: the task of every sample, or ``{group_id: task}`` for a request of several groups."""
        start = time.time()
        if self.simulated_latency_s > 0:
            # Stands in for a verifier that waits (sandboxed code run, tool call, judge model):
            # I/O-bound, so it costs wall time but no CPU. The groups of one request are verified
            # concurrently, as separate sandboxes would. Used by the benchmarks, named there.
            await asyncio.sleep(self.simulated_latency_s)
        scored = await self.guard.score(samples, tasks)
        if hasattr(self.env, "response_info"):  # the env's per-response metrics, e.g. parse validity
            scored = [s.replace(reward_info={**self.env.response_info(s.response_text, task_of(tasks, s)),
                                             **s.reward_info}) for s in scored]
        end = time.time()
        stamped: dict[int, tuple[dict, dict]] = {}  # one new timings dict per (shared) dict the samples came with
        for s in scored:  # the guard's own copies
            old = s.timings
            if id(old) not in stamped:
                stamped[id(old)] = (old, {**old, "reward_start": start, "reward_end": end})
            s.timings = stamped[id(old)][1]
        return await self.forwarder.forward(scored, route)

    def check_health(self) -> None:
        self.watch.check()
