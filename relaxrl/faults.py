"""Surviving faults of role replicas: retry what a dead or hung replica lost, restart hung replicas.

* ``FaultConfig`` (config node ``faults``): retries, timeouts and health-check settings.
* ``is_retryable``: an error that says a replica (or an object it held) is gone, or a timeout, is
  worth retrying on another replica; an exception raised by the role's own code is not (it would
  fail again), so its group is dropped and counted instead.
* ``trainer_restarts``: a lost trainer replica is restored in the same run from the run's newest
  checkpoint this many times (``driver.run``), then the run stops with ``TrainerLost``.
* ``RequestWatch``: a replica records when each request's work started; its ``check_health``
  (called by Serve every ``health_check_period_s``) fails once some work has run longer than
  ``hang_timeout_s``, and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass
class FaultConfig:
    max_retries: int = 2  # retries of a group's role calls after a replica fault; then dropped and counted
    role_timeout_s: float = 300.0  # a generate -> reward -> teacher chain slower than this is cancelled and retried
    hang_timeout_s: float = 600.0  # a replica whose request has run longer than this is unhealthy: Serve restarts it
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    publish_timeout_s: float = 120.0  # weight publication; past it the run stops with an error, never hangs
    sync_timeout_s: float = 120.0  # a rollout's weight fetch; past it the replica keeps its weights (counted)
    trainer_restarts: int = 2  # in-run restores of a lost trainer from the newest checkpoint; then TrainerLost
    trainer_restore_timeout_s: float = 300.0  # for Serve to bring the replicas back during such a restore


# Serve's poll while a replica drains before it exits (its default is 2 s). A run deletes its apps
# only after it has ended, with nothing in flight, so each poll of an idle replica is pure delay at
# every run's (and every pipeline stage's) end; requests still running are waited for as before,
# up to graceful_shutdown_timeout_s.
DRAIN_POLL_S = 0.1


def replica_options(f: FaultConfig) -> dict:
    """The Serve deployment options every role gets from the fault config."""
    return {"health_check_period_s": f.health_check_period_s, "health_check_timeout_s": f.health_check_timeout_s,
            "graceful_shutdown_wait_loop_s": DRAIN_POLL_S}


class ReplicaStateLost(RuntimeError):
    """A stateful replica (the trainer) was restarted by Serve and no longer holds the run's state."""


def fault_reason(e: BaseException) -> str:
    """The name a fault is counted under: ``timeout`` or the exception's type."""
    return "timeout" if isinstance(e, (asyncio.TimeoutError, TimeoutError)) else type(e).__name__


def is_retryable(e: BaseException) -> bool:
    """True for a lost replica, lost object or timeout; False for an error raised by role code."""
    import ray.exceptions as rex
    from ray.serve.exceptions import RayServeException, ReplicaUnavailableError

    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return True
    lost = (rex.RayActorError, rex.ObjectLostError, rex.WorkerCrashedError, rex.NodeDiedError,
            ReplicaUnavailableError)

    def was_lost(err: BaseException) -> bool:
        if isinstance(err, lost):
            return True
        # A role failed because a role after it on the chain (or an object it needed) was lost: the
        # error comes back wrapped once per role on the way.
        if isinstance(err, rex.RayTaskError):
            return err.cause is not None and was_lost(err.cause)
        # Serve reports a chained call whose upstream replica died as a plain RayServeException.
        return isinstance(err, RayServeException) and "died" in str(err)

    return was_lost(e)


class RequestWatch:
    """Start times of the work a replica is doing, for a health check that catches hangs.

    Work run in a thread is tracked inside the thread (``wrap``), so a request that the caller
    cancelled while its thread is stuck still counts as hung."""

    def __init__(self, hang_timeout_s: float) -> None:
        self.hang_timeout_s = hang_timeout_s
        self._running: dict[int, float] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            with self.tracking():
                return fn(*args, **kwargs)

        return tracked

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Track the work inside the ``with`` block (e.g. an awaited streaming generation)."""
        key = next(self._ids)
        with self._lock:
            self._running[key] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(key, None)

    def oldest_s(self) -> float:
        with self._lock:
            starts = list(self._running.values())
        return time.monotonic() - min(starts) if starts else 0.0

    def check(self) -> None:
        """Raise if some work has run past ``hang_timeout_s`` (Serve then restarts the replica)."""
        age = self.oldest_s()
        if age > self.hang_timeout_s:
            raise RuntimeError(f"replica hung: a request has been running for {age:.1f}s > {self.hang_timeout_s}s")


def replica_actors(app_name: str) -> list[Any]:
    """Handles of the live replica actors of a Serve application (to inspect, or to kill in drills)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#"
    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def kill_replicas(app_name: str) -> list[str]:
    """Kill every replica of a Serve application (Serve starts new ones); returns their actor ids."""
    import ray

    killed = []
    for replica in replica_actors(app_name):
        killed.append(replica._actor_id.hex())
        ray.kill(replica, no_restart=True)
    return killed


async def wait_replaced(app_name: str, old_ids: list[str], count: int, timeout_s: float) -> None:
    """Wait until ``app_name`` has ``count`` replicas, none of them ``old_ids``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = [r._actor_id.hex() for r in replica_actors(app_name)]
        if len(ids) >= count and not set(ids) & set(old_ids):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"Serve did not replace the replicas of {app_name} within {timeout_s}s")
