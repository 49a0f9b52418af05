"""Rollout role: samples a group of responses per request with the newest published weights.

Two paths (``rollout.streaming``):

* batch-synchronous (default): Serve merges concurrent requests into one ``generate`` call
  (``serve.batch``); weights change only between calls, so a call's samples share one version and
  the call lasts as long as its longest response;
* streaming: every request goes to a streaming engine on its own (continuous batching: it joins
  the running batch at once and returns when its own responses end), and a background task loads
  each published version in flight, between engine steps; a response then records the version of
  each token (``Sample.token_versions``), and ``relaxrl.partial.on_weight_update`` decides for each
  group in flight whether it continues under the new weights or is generated again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.engines.base import Generation, SamplingParams
from relaxrl.groups import GroupRequest, prompts_of, samples_from_generations
from relaxrl.partial import Decision, on_weight_update
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
        streaming: bool = False,
        stream_chunk_tokens: int = 16,
        max_staleness: int = 1,
        partial: str = "continue",
    ) -> None:
        from relaxrl.engines.factory import check_sampling, make_generation_engine
        from relaxrl.faults import RequestWatch

        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)  # the trainer's CPUs (trainer.cpus)
        set_threads(torch_threads)
        check_sampling(engine, sampling)
        self.streaming = bool(streaming)
        if self.streaming:
            self.engine = make_streaming_engine(engine, model_dir, lora=lora, dtype=dtype, torch_threads=torch_threads,
                                                vllm=vllm, seed=seed, chunk_tokens=stream_chunk_tokens)
        else:
            self.engine = make_generation_engine(
                engine, model_dir, lora=lora, dtype=dtype, torch_threads=torch_threads, vllm=vllm, seed=seed
            )
        self.max_staleness = int(max_staleness)
        self.partial = partial
        self.partial_aborted = 0  # groups generated again after an update left them untrainable (or mode=abort)
        self._inflight: dict[int, "_Inflight"] = {}  # streaming: groups being generated, by task id
        self._following: Optional[asyncio.Task] = None
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
        if self.streaming:
            samples = await self._generate_streaming(list(requests))
        else:
            samples = await self._generate_batch(list(requests))
        return await self.forwarder.forward(samples, route)

    async def _wait_for_weights(self, version: int) -> None:
        if self.streaming:
            self._follow()  # the follower (or the broadcast receiver) loads it; wait for the engine
        elif self.receiver is None:
            await self.weights.wait_for(version)
            return
        while self.engine.version < version:  # the receiver thread or the follower adopts each version
            if self.receiver is not None:
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

    # ------------------------------------------------------------------ streaming

    async def _generate_streaming(self, requests: list[GroupRequest]) -> list[Sample]:
        """Each group on its own in the streaming engine; weights may change under it."""
        self._follow()
        if self.receiver is not None:
            self.receiver.check()
        start = time.time()
        gens = [g for group in await asyncio.gather(*(self._group(r) for r in requests)) for g in group]
        loaded = self.weights.last_load_within(start)
        timings = {**loaded, "gen_start": start, "gen_end": time.time()}
        groups = samples_from_generations(requests, gens, self.engine.tokenizer, self.engine.version, timings)
        return [with_token_versions(s, g) for s, g in zip((s for grp in groups for s in grp), gens)]

    async def _group(self, request: GroupRequest) -> list[Generation]:
        """One group's generations; started again from its prompt (same seed) when a weight update
        aborts it."""
        params = SamplingParams(seed=request.seed, **self.sampling)
        while True:
            entry = _Inflight(self.engine.version)
            entry.task = asyncio.ensure_future(self.engine.agenerate(prompts_of([request]), params))
            self._inflight[id(entry)] = entry
            try:
                return await entry.task
            except asyncio.CancelledError:
                if not entry.aborted:  # the caller's own cancellation
                    entry.task.cancel()
                    raise
                self.partial_aborted += 1
            finally:
                self._inflight.pop(id(entry), None)

    def _on_loaded(self, version: int) -> None:
        """After an in-flight load: the decision point for every group still generating."""
        for entry in list(self._inflight.values()):
            if on_weight_update(entry.start_version, version, max_staleness=self.max_staleness,
                                mode=self.partial) is Decision.ABORT:
                entry.abort()

    def _follow(self) -> None:
        """Start the background task that loads each published version in flight (once, on the
        replica's event loop)."""
        if self._following is None and self.receiver is None:
            self._following = asyncio.ensure_future(self.weights.follow(self._on_loaded))

    def _generate(self, prompts, params):
        with self._weights_lock:
            return self.engine.generate(prompts, params), self.engine.version

    def stats(self) -> dict:
        return {"version": self.engine.version, "weight_loads": self.weights.loads, "sync_s": self.weights.sync_s,
                "streaming": self.streaming, "partial_aborted": self.partial_aborted,
                "sync_bytes": self.weights.sync_bytes + (self.receiver.stats.bytes if self.receiver else 0),
                "broadcast_loads": self.receiver.loads if self.receiver else 0,
                "broadcast_s": self.receiver.stats.seconds if self.receiver else 0.0,
                "sync_failures": self.weights.failures}

    def check_health(self) -> None:
        self.watch.check()


class _Inflight:
    """A group being generated by the streaming engine: the version it started under (its oldest
    token's, conservatively: a group with no token yet counts as having one) and how to abort it."""

    def __init__(self, start_version: int) -> None:
        self.start_version = int(start_version)
        self.aborted = False
        self.task: Optional[asyncio.Future] = None

    def abort(self) -> None:
        self.aborted = True
        if self.task is not None:
            self.task.cancel()


def with_token_versions(sample: Sample, gen: Generation) -> Sample:
    """``sample`` with the versions of ``gen``'s tokens: ``policy_version`` is the oldest (what the
    staleness bound counts, as ``relaxrl.partial``), ``token_versions`` the full list when the
    response spans more than one version (empty: every token at ``policy_version``)."""
    versions = list(gen.token_versions)
    if not versions:
        return sample
    sample.policy_version = versions[0]
    sample.token_versions = versions if len(set(versions)) > 1 else []
    return sample


def make_streaming_engine(engine: str, model_dir: str, *, lora: Optional[dict], dtype: str, torch_threads: int,
                          vllm: Optional[dict], seed: int, chunk_tokens: int) -> Any:
    """The streaming engine of ``rollout.engine`` (``rollout.streaming=true``)."""
    from relaxrl.engines.factory import make_generation_engine
    from relaxrl.models.lora import LoraConfig

    if engine == "vllm":
        from relaxrl.engines.factory import _require

        _require("vllm", engine, "rollout")  # names the package and the option if it is missing
        from relaxrl.engines.vllm_generation import StreamingVLLMEngine

        return StreamingVLLMEngine(model_dir, lora=LoraConfig(**lora) if lora else None, dtype=dtype, options=vllm,
                                   seed=seed)
    from relaxrl.engines.hf_generation import StreamingHFEngine

    return StreamingHFEngine(make_generation_engine(engine, model_dir, lora=lora, dtype=dtype,
                                                    torch_threads=torch_threads, seed=seed),
                             chunk_tokens=chunk_tokens)
