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
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
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

        ``tasks``: one task for all samples, or ``{group_id: task}`` when they answer several prompts.
        Every sample is one job in the pool, all awaited by one waiter thread: a cross-thread wake-up
        per request, not per sample (which cost ~40 us a sample, more than most verifiers)."""
        futures = [self.pool.submit(self.verify, s.response_text, task_of(tasks, s)) for s in samples]
        await asyncio.to_thread(wait_futures, futures, self.timeout_s)
        return [self._outcome(s, f, task_of(tasks, s)) for s, f in zip(samples, futures)]

    def _outcome(self, sample: Sample, fut: Future, task: Task) -> Sample:
        if not fut.done():
            fut.cancel()  # not started yet: never runs; started: its thread is lost to the hang
            info = {"error": "verifier_timeout", "detail": f"no answer within {self.timeout_s}s"}
        elif (e := fut.exception()) is not None:  # a verifier bug must not take the replica down
            info = {"error": "verifier_error", "detail": f"{type(e).__name__}: {e}"[:200]}
        else:
            try:
                reward = float(fut.result())
            except (TypeError, ValueError) as e:
                reward, info = None, {"error": "verifier_error", "detail": f"{type(e).__name__}: {e}"[:200]}
            if reward is not None and math.isfinite(reward):
                return sample.replace(reward=reward)
            if reward is not None:
                info = {"error": "reward_nonfinite", "detail": repr(reward)}
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
        raise KeyError(f"sample {sample.uid}: no task for group {sample.group_id!r} "
                       f"(tasks for {sorted(tasks)})") from None
