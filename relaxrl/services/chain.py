"""A request's way through the roles: rollout → reward → (teacher calls) → queue.

The driver sends each request to the rollout with a ``Route``: the roles still to call and the
queue to put into at the end. Every role, once its own work is done, hands its output straight to
the next stop and answers with what that stop answered, so samples go role to role in one hop
each (pickled column-wise, ``relaxrl.sample.Packed``) and the driver makes one call per request,
not one per role (on the synchronous critical path each hop through the driver cost a Serve round
trip: see docs/benchmarks.md).

A route is retried as a whole by the driver (``relaxrl.driver.run_request``). The queue's put is the
chain's last step, so a retry may reach it after an earlier attempt did: the put carries the
attempt number, and the queue ignores (and counts) the samples of groups already delivered
(``StalenessQueue.put``). No sample is queued twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from relaxrl.sample import Packed


@dataclass(frozen=True)
class Stop:
    """One role call on the way: ``<app>.<method>(samples, **kwargs, route=<rest>)``."""

    app: str  # the role's Serve application, e.g. "reward-<run id>"
    method: str = "score"
    kwargs: dict = field(default_factory=dict)  # e.g. the reward's tasks, the teacher's name and field
    model_id: str = ""  # Serve multiplexed model id: to a replica holding this domain's teacher


@dataclass(frozen=True)
class Route:
    stops: tuple[Stop, ...]  # the roles still to call, in order
    queue: str  # the run's queue actor (named); its put is the last step
    namespace: str
    attempt: int = 0  # the driver's attempt at this request (0 = first): a retried put is idempotent


class Forwarder:
    """What a role replica uses to send its output on along a route (handles cached per target)."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}
        self._queues: dict[tuple[str, str], Any] = {}

    async def forward(self, samples: list, route: Optional[Route]) -> Any:
        """``samples`` themselves without a route; else the next stop's answer (the queue's at the end)."""
        if route is None:
            return samples
        if not route.stops:
            return await self._queue(route).put.remote(Packed(samples), route.attempt)
        stop, rest = route.stops[0], replace(route, stops=route.stops[1:])
        handle = self._handle(stop.app)
        if stop.model_id:
            handle = handle.options(multiplexed_model_id=stop.model_id)
        response = getattr(handle, stop.method).remote(Packed(samples), **stop.kwargs, route=rest)
        try:
            return await response
        except asyncio.CancelledError:  # this request was called off or timed out: so is the next one
            response.cancel()
            raise

    def _handle(self, app: str) -> Any:
        if app not in self._handles:
            from ray import serve

            self._handles[app] = serve.get_app_handle(app)
        return self._handles[app]

    def _queue(self, route: Route) -> Any:
        key = (route.queue, route.namespace)
        if key not in self._queues:
            import ray

            self._queues[key] = ray.get_actor(route.queue, namespace=route.namespace)
        return self._queues[key]
