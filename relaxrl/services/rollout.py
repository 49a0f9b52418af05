"""Rollout role: samples a group of responses per request with the newest published weights."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.engines.base import SamplingParams
from relaxrl.groups import GroupRequest, prompts_of, samples_from_generations
from relaxrl.sample import Sample
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import WeightFollower, keep_off_cpus, quiet_replica_logs, set_threads


@serve.deployment(max_ongoing_requests=64)
class Rollout:
    def __init__(
        self,
        model_dir: str,
        *,
        sampling: dict,
        lora: Optional[dict] = None,
        dtype: str = "float32",
        torch_threads: int = 1,
        store_name: Optional[str] = None,
        namespace: str = "relaxrl",
        batch_max_groups: int = 8,
        groups_per_request: int = 1,
        batch_wait_s: float = 0.005,
        engine: str = "hf",
        vllm: Optional[dict] = None,
        seed: int = 0,
        weight_sync: Optional[dict] = None,
        hang_timeout_s: float = 600.0,
        sync_timeout_s: float = 120.0,
        avoid_cpus: Sequence[int] = (),
    ) -> None:
        from relaxrl.engines.factory import check_sampling, make_generation_engine
        from relaxrl.faults import RequestWatch

        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)  # the trainer's CPUs (trainer.cpus)
        set_threads(torch_threads)
        check_sampling(engine, sampling)
        self.engine = make_generation_engine(
            engine, model_dir, lora=lora, dtype=dtype, torch_threads=torch_threads, vllm=vllm, seed=seed
        )
        self.weights = WeightFollower(self.engine, store_name, namespace, timeout_s=sync_timeout_s)
        self.watch = RequestWatch(hang_timeout_s)
        self._weights_lock = threading.Lock()  # weights never change during a generate call
        self.receiver = None
        if weight_sync and weight_sync.get("method") == "broadcast":
            import ray

            from relaxrl.services.broadcast_sync import BroadcastReceiver

            coordinator = ray.get_actor(weight_sync["coordinator"], namespace=namespace)
            self.receiver = BroadcastReceiver(self.engine, coordinator, weight_sync["backend"], self._weights_lock)
        self.sampling = sampling
        self.forwarder = Forwarder()
        # Serve batches requests; each carries up to groups_per_request groups.
        self._generate_batch.set_max_batch_size(max(1, batch_max_groups // max(1, groups_per_request)))
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def generate(self, requests: list[GroupRequest], route: Optional[Route] = None) -> Any:
        """Samples of every group in ``requests`` (one driver request carries several groups), in
        order; with a ``route``, they go on to its next stop and this answers what the chain's end did.

        A request sent ahead of the weights it needs (``min_version``) waits for their publication
        here, then joins a batch."""
        need = max((r.min_version for r in requests), default=0)
        if need > self.engine.version:
            await self._wait_for_weights(need)
        return await self.forwarder.forward(await self._generate_batch(list(requests)), route)

    async def _wait_for_weights(self, version: int) -> None:
        if self.receiver is None:
            await self.weights.wait_for(version)
            return
        while self.engine.version < version:  # broadcast: the receiver thread adopts each version
            self.receiver.check()
            await asyncio.sleep(0.005)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, batches: list[list[GroupRequest]]) -> list[list[Sample]]:
        # Serve merges concurrent driver requests into one generate call. Weights change only
        # between calls, so every sample of a call has one version.
        requests = [r for batch in batches for r in batch]
        loaded = await self.weights.sync()
        params = SamplingParams(seed=requests[0].seed, **self.sampling)
        start = time.time()
        if self.receiver is not None:
            self.receiver.check()
        gens, version = await asyncio.to_thread(self.watch.wrap(self._generate), prompts_of(requests), params)
        timings = {**loaded, "gen_start": start, "gen_end": time.time()}
        groups = iter(samples_from_generations(requests, gens, self.engine.tokenizer, version, timings))
        return [[s for _ in batch for s in next(groups)] for batch in batches]

    def _generate(self, prompts, params):
        with self._weights_lock:
            return self.engine.generate(prompts, params), self.engine.version

    def stats(self) -> dict:
        return {"version": self.engine.version, "weight_loads": self.weights.loads, "sync_s": self.weights.sync_s,
                "sync_bytes": self.weights.sync_bytes + (self.receiver.stats.bytes if self.receiver else 0),
                "broadcast_loads": self.receiver.loads if self.receiver else 0,
                "broadcast_s": self.receiver.stats.seconds if self.receiver else 0.0,
                "sync_failures": self.weights.failures}

    def check_health(self) -> None:
        self.watch.check()
