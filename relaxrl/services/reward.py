"""Reward role: runs the env's verifier on each response, guarding against errors and hangs."""

from __future__ import annotations

from ray import serve

from relaxrl.envs.base import Task
from relaxrl.sample import Sample
from relaxrl.services.common import quiet_replica_logs


@serve.deployment(max_ongoing_requests=64)
class Reward:
    def __init__(self, env: dict, *, timeout_s: float = 10.0, max_workers: int = 8,
                 on_error: str = "drop", error_reward: float = 0.0, hang_timeout_s: float = 600.0) -> None:
        from relaxrl.envs.guarded import GuardedVerifier
        from relaxrl.envs.registry import make_env
        from relaxrl.faults import RequestWatch

        quiet_replica_logs()
        self.env = make_env(**env)
        self.watch = RequestWatch(hang_timeout_s)  # a verifier stuck this long makes the replica unhealthy
        self.guard = GuardedVerifier(self.env.verify, timeout_s=timeout_s, max_workers=max_workers,
                                     on_error=on_error, error_reward=error_reward, track=self.watch.wrap)

    async def score(self, samples: list[Sample], task: Task) -> list[Sample]:
        """Samples with ``reward`` set; a failed verification leaves it None (or error_reward)."""
        return await self.guard.score(samples, task)

    def check_health(self) -> None:
        self.watch.check()
