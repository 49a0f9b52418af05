"""Reward role: runs the env's verifier on each response, guarding against errors and hangs."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from relaxrl.envs.base import Task
from relaxrl.sample import Sample
from relaxrl.services.common import quiet_replica_logs


@serve.deployment(max_ongoing_requests=64)
class Reward:
    def __init__(self, env: dict, *, timeout_s: float = 10.0, max_workers: int = 8,
                 on_error: str = "drop", error_reward: float = 0.0, simulated_latency_s: float = 0.0) -> None:
        from relaxrl.envs.registry import make_env

        if on_error not in ("drop", "zero"):
            raise ValueError(f"reward.on_error must be 'drop' or 'zero', got {on_error!r}")
        quiet_replica_logs()
        self.env = make_env(**env)
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.error_reward = error_reward
        self.simulated_latency_s = simulated_latency_s
        # A hung verifier keeps its thread; the pool is sized so others go on meanwhile.
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="verifier")

    async def score(self, samples: list[Sample], task: Task) -> list[Sample]:
        """Samples with ``reward`` set; a failed verification leaves it None (or error_reward)."""
        start = time.time()
        if self.simulated_latency_s > 0:
            # Stands in for a verifier that waits (sandboxed code run, tool call, judge model):
            # I/O-bound, so it costs wall time but no CPU. Used by the benchmarks, named there.
            await asyncio.sleep(self.simulated_latency_s)
        scored = await asyncio.gather(*(self._score_one(s, task) for s in samples))
        end = time.time()
        return [s.replace(timings={**s.timings, "reward_start": start, "reward_end": end}) for s in scored]

    async def _score_one(self, sample: Sample, task: Task) -> Sample:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self.env.verify, sample.response_text, task)
        try:
            reward = float(await asyncio.wait_for(fut, self.timeout_s))
            return sample.replace(reward=reward)
        except asyncio.TimeoutError:
            info = {"error": "verifier_timeout"}
        except Exception as e:  # a verifier bug must not take the replica down
            info = {"error": "verifier_error", "detail": f"{type(e).__name__}: {e}"[:200]}
        reward = self.error_reward if self.on_error == "zero" else None
        return sample.replace(reward=reward, reward_info=info)
