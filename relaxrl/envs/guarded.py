"""Verifier calls that can fail, hang or return garbage, turned into counted outcomes.

A verifier is user code: it may raise, never return, or return NaN/inf. ``GuardedVerifier`` runs it
in a thread pool with a timeout and records what went wrong on the sample (``reward_info["error"]``
is ``verifier_error``, ``verifier_timeout`` or ``reward_nonfinite``) instead of raising, so the
producer drops the group and counts the reason, and nothing non-finite reaches the trainer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

from relaxrl.envs.base import Task
from relaxrl.sample import Sample

log = logging.getLogger(__name__)

ON_ERROR = ("drop", "zero")


class GuardedVerifier:
    def __init__(
        self,
        verify: Callable[[str, Task], Any],
        *,
        timeout_s: float = 10.0,
        max_workers: int = 8,
        on_error: str = "drop",
        error_reward: float = 0.0,
        track: Optional[Callable[[Callable], Callable]] = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"reward.on_error must be 'drop' or 'zero', got {on_error!r}")
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s}")
        self.verify = track(verify) if track else verify
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.error_reward = error_reward
        # A hung verifier keeps its thread; the pool is sized so others go on meanwhile.
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="verifier")

    async def score(self, samples: list[Sample], tasks: Union[Task, dict[str, Task]]) -> list[Sample]:
        """Samples with ``reward`` set; a failed verification leaves it None (or ``error_reward``).

        ``tasks``: one task for all samples, or ``{group_id: task}`` when they answer several prompts."""
        return list(await asyncio.gather(*(self.score_one(s, task_of(tasks, s)) for s in samples)))

    async def score_one(self, sample: Sample, task: Task) -> Sample:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self.verify, sample.response_text, task)
        try:
            reward = float(await asyncio.wait_for(fut, self.timeout_s))
            if math.isfinite(reward):
                return sample.replace(reward=reward)
            info = {"error": "reward_nonfinite", "detail": repr(reward)}
        except asyncio.TimeoutError:
            info = {"error": "verifier_timeout", "detail": f"no answer within {self.timeout_s}s"}
        except Exception as e:  # a verifier bug must not take the replica down
            info = {"error": "verifier_error", "detail": f"{type(e).__name__}: {e}"[:200]}
        log.warning("sample %s (task %s): %s %s", sample.uid, task.task_id, info["error"], info["detail"])
        reward = self.error_reward if self.on_error == "zero" else None
        return sample.replace(reward=reward, reward_info=info)


def task_of(tasks: Union[Task, dict[str, Task]], sample: Sample) -> Task:
    """The task ``sample`` answers: ``tasks`` itself, or its entry for the sample's group."""
    if not isinstance(tasks, dict):
        return tasks
    try:
        return tasks[sample.group_id]
    except KeyError:
        raise KeyError(f"sample {sample.uid}: no task for group {sample.group_id!r} (tasks for {sorted(tasks)})") from None
