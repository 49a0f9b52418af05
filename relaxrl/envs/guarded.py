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
import threading
from concurrent.futures import ThreadPoolExecutor
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
        self.max_workers = max_workers
        # A hung verifier keeps its thread; the pool is sized so others go on meanwhile.
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="verifier")

    async def score(self, samples: list[Sample], tasks: Union[Task, dict[str, Task]]) -> list[Sample]:
        """Samples with ``reward`` set; a failed verification leaves it None (or ``error_reward``).

        ``tasks``: one task for all samples, or ``{group_id: task}`` when they answer several prompts.
        The samples are verified in ``max_workers`` runs of consecutive samples, one pool job each
        (a job per sample cost ~20 us of pool traffic apiece, more than most verifiers). If the
        request is not done within ``timeout_s``, a sample still running is a timeout, and the
        samples queued behind it in its run get a job of their own and ``timeout_s`` more: a hung
        verifier costs its own sample only."""
        work = _Runs(self.verify, [(s.response_text, task_of(tasks, s)) for s in samples])
        runs = [self.pool.submit(work.run, chunk) for chunk in _split(len(samples), self.max_workers)]
        done, _ = await asyncio.to_thread(wait_futures, runs, self.timeout_s)
        if len(done) < len(runs):
            behind = [self.pool.submit(work.run_claimed, i) for i in work.claim_unstarted()]
            await asyncio.to_thread(wait_futures, behind, self.timeout_s)
        return [self._outcome(s, work.results[i], task_of(tasks, s)) for i, s in enumerate(samples)]

    def _outcome(self, sample: Sample, result: Optional[tuple[bool, Any]], task: Task) -> Sample:
        if result is None:  # still running (hung), or queued behind a hung one and not reached in time
            info = {"error": "verifier_timeout", "detail": f"no answer within {self.timeout_s}s"}
        elif not result[0]:  # a verifier bug must not take the replica down
            e = result[1]
            info = {"error": "verifier_error", "detail": f"{type(e).__name__}: {e}"[:200]}
        else:
            try:
                reward = float(result[1])
            except (TypeError, ValueError) as e:
                reward, info = None, {"error": "verifier_error", "detail": f"{type(e).__name__}: {e}"[:200]}
            if reward is not None and math.isfinite(reward):
                return sample.replace(reward=reward)
            if reward is not None:
                info = {"error": "reward_nonfinite", "detail": repr(reward)}
        log.warning("sample %s (task %s): %s %s", sample.uid, task.task_id, info["error"], info["detail"])
        reward = self.error_reward if self.on_error == "zero" else None
        return sample.replace(reward=reward, reward_info=info)


class _Runs:
    """One request's verifier calls, run by pool jobs that each claim samples before running them,
    so a sample runs once even when the samples behind a hung one are handed to new jobs."""

    def __init__(self, verify: Callable[[str, Task], Any], jobs: list[tuple[str, Task]]) -> None:
        self.verify, self.jobs = verify, jobs
        self.results: list[Optional[tuple[bool, Any]]] = [None] * len(jobs)  # (ok, value or exception)
        self._claimed = [False] * len(jobs)
        self._lock = threading.Lock()

    def _claim(self, i: int) -> bool:
        with self._lock:
            if self._claimed[i]:
                return False
            self._claimed[i] = True
            return True

    def claim_unstarted(self) -> list[int]:
        return [i for i in range(len(self.jobs)) if self._claim(i)]

    def run(self, indices: list[int]) -> None:
        for i in indices:
            if self._claim(i):
                self.run_claimed(i)

    def run_claimed(self, i: int) -> None:
        try:
            self.results[i] = (True, self.verify(*self.jobs[i]))
        except Exception as e:
            self.results[i] = (False, e)


def _split(n: int, parts: int) -> list[list[int]]:
    """``range(n)`` in at most ``parts`` runs of consecutive indices, as even as possible."""
    size = -(-n // max(1, min(parts, n))) if n else 1
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def task_of(tasks: Union[Task, dict[str, Task]], sample: Sample) -> Task:
    """The task ``sample`` answers: ``tasks`` itself, or its entry for the sample's group."""
    if not isinstance(tasks, dict):
        return tasks
    try:
        return tasks[sample.group_id]
    except KeyError:
        raise KeyError(f"sample {sample.uid}: no task for group {sample.group_id!r} "
                       f"(tasks for {sorted(tasks)})") from None
