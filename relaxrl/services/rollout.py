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

Partial rollouts across a checkpoint (streaming): the replica keeps a ``PartialGroup`` per group in
flight, updated as the engine reports tokens (both streaming engines' ``on_tokens``, asked for only
in a run that checkpoints while it goes: ``record_partials``), and records them into the
queue when the driver asks before a checkpoint (it long-polls ``QueueActor.partials_wanted``). A
resumed run hands a re-issued group its record (``generate(..., partials=...)``): each response
goes on from its kept tokens (prompt + kept ids as the prompt, the token limit reduced, the kept
log-probs and versions in front), if the bound still allows it, else it is generated again, counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.engines.base import Generation, SamplingParams
from relaxrl.groups import GroupRequest, prompts_of, samples_from_generations
from relaxrl.partial import (Decision, PartialGroup, PartialResponse, continuation, finished, joined,
                             on_weight_update)
from relaxrl.sample import Sample
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import WeightFollower, keep_off_cpus, quiet_replica_logs, set_threads

log = logging.getLogger(__name__)


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
        record_partials: bool = True,
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
        # Keep a record of each group in flight for the next checkpoint (off when the run writes none
        # while it goes: the vLLM engine then yields once per request, with no Python per step).
        self.record_partials = bool(record_partials)
        self.partial_aborted = 0  # groups generated again after an update left them untrainable (or mode=abort)
        self.partials_continued = 0  # resumed groups that went on from their recorded tokens
        self.partials_discarded = 0  # resumed groups whose record the bound (or mode=abort) refused
        self.partials_recorded = 0  # records sent to the queue for checkpoints
        self._inflight: dict[int, "_Inflight"] = {}  # streaming: groups being generated, by task id
        self._records_lock = threading.Lock()  # the engine's thread extends the records, the loop reads them
        self._following: Optional[asyncio.Task] = None
        self._listening: Optional[asyncio.Task] = None
        self._queue_handle: Any = None  # the run's queue actor, from the first request's route
        self._replica_id = uuid.uuid4().hex
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

    async def generate(self, requests: list[GroupRequest], route: Optional[Route] = None,
                       partials: Optional[dict[str, dict]] = None) -> Any:
        """Samples of every group in ``requests`` (one driver request carries several groups), in
        order; with a ``route``, they go on to its next stop and this answers what the chain's end did.

        A request sent ahead of the weights it needs (``min_version``) waits for their publication
        here, then joins a batch. ``partials``: a resumed run's recorded partial rollouts of some of
        these groups (``PartialGroup.to_json()`` by group id), continued rather than generated again."""
        need = max((r.min_version for r in requests), default=0)
        if need > self.engine.version:
            await self._wait_for_weights(need)
        continued = regenerated = 0
        if self.streaming:
            self._listen(route)
            kept = {gid: PartialGroup.from_json(d) for gid, d in (partials or {}).items()}
            samples, continued, regenerated = await self._generate_streaming(list(requests), kept)
        else:  # the batch engine does not continue records: they are generated again, counted
            samples = await self._generate_batch(list(requests))
        answer = await self.forwarder.forward(samples, route)
        if (partials or regenerated) and route is not None:  # counted run-wide once delivered
            await self._queue(route).note_partials.remote(continued, len(partials or ()) - continued, regenerated)
        return answer

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

    async def _generate_streaming(self, requests: list[GroupRequest],
                                  kept: dict[str, PartialGroup]) -> tuple[list[Sample], int, int]:
        """Each group on its own in the streaming engine; weights may change under it. A group with
        a record in ``kept`` goes on from it; returns the samples, how many records went on and how
        many generations a weight update made start again."""
        self._follow()
        if self.receiver is not None:
            self.receiver.check()
        start = time.time()
        outcomes = await asyncio.gather(*(self._group(r, kept.get(r.group_id)) for r in requests))
        gens = [g for group, _, _ in outcomes for g in group]
        loaded = self.weights.last_load_within(start)
        timings = {**loaded, "gen_start": start, "gen_end": time.time()}
        groups = samples_from_generations(requests, gens, self.engine.tokenizer, self.engine.version, timings)
        samples = [with_token_versions(s, g) for s, g in zip((s for grp in groups for s in grp), gens)]
        return samples, sum(went_on for _, went_on, _ in outcomes), sum(again for _, _, again in outcomes)

    async def _group(self, request: GroupRequest,
                     kept: Optional[PartialGroup] = None) -> tuple[list[Generation], bool, int]:
        """One group's generations, whether they went on from ``kept`` (a resumed run's record
        of it) and how many times a weight update aborted it. Kept only while the bound allows it under the weights now loaded (as if those had
        landed mid-generation: ``on_weight_update``); started again from its prompt (same seed) when
        that refuses it or a weight update aborts it."""
        params = SamplingParams(seed=request.seed, **self.sampling)
        if kept is not None:
            if on_weight_update(kept.oldest_version, self.engine.version, max_staleness=self.max_staleness,
                                mode=self.partial) is Decision.ABORT:
                self.partials_discarded += 1
                kept = None
            else:
                self.partials_continued += 1
        went_on, again = kept is not None, 0
        while True:
            entry = _Inflight(request.group_id, self.engine.version, kept)
            entry.task = asyncio.ensure_future(self._attempt(request, params, entry))
            self._inflight[id(entry)] = entry
            try:
                with self.watch.tracking():  # a generation that never ends fails the health check
                    return await entry.task, went_on, again
            except asyncio.CancelledError:
                if not entry.aborted:  # the caller's own cancellation
                    entry.task.cancel()
                    raise
                self.partial_aborted += 1
                again += 1
                kept = None  # its tokens go with it: from the prompt again
            finally:
                self._inflight.pop(id(entry), None)

    async def _attempt(self, request: GroupRequest, params: SamplingParams, entry: "_Inflight") -> list[Generation]:
        """One try at a group: from its prompt, or each response from its kept tokens."""
        def hook(index: Optional[int] = None) -> dict:
            """``on_tokens`` into the group's record, for an engine that reports its chunks;
            ``index``: the response every prompt of the call continues (else the prompt's own)."""
            if not (self.record_partials and getattr(self.engine, "reports_tokens", False)):
                return {}
            return {"on_tokens": lambda i, *args: self._extend(entry, i if index is None else index, *args)}

        if entry.kept is None:
            return await self.engine.agenerate(prompts_of([request]), params, **hook())

        async def one(index: int) -> Generation:
            mine = entry.kept.response(index)
            todo = continuation(mine, request.prompt_ids, params.max_new_tokens)
            if todo is None:
                return as_generation(finished(mine))
            prompt, left = todo
            # Its own seed (the group's is per prompt index in the engine, and this submits one prompt).
            seed = None if request.seed is None else request.seed * 1_000_003 + index
            [g] = await self.engine.agenerate([prompt], dataclasses.replace(params, max_new_tokens=left, seed=seed),
                                              **hook(index))
            versions = list(g.token_versions) or [self.engine.version] * len(g.response_ids)
            return as_generation(joined(mine, g.response_ids, g.logprobs, versions, g.finish_reason))

        return list(await asyncio.gather(*(one(i) for i in range(request.n))))

    def _extend(self, entry: "_Inflight", index: int, ids, logprobs, version: int, finish: str) -> None:
        """The engine's report of a response's new tokens (on its thread): into the group's record."""
        with self._records_lock:
            r = entry.record.response(index)
            if ids:
                r.extend(ids, logprobs, version)
            r.finish_reason = finish or r.finish_reason

    def records(self) -> list[dict]:
        """The partial rollouts of the groups in flight (``PartialGroup.to_json()``), those with a token."""
        with self._records_lock:
            return [e.record.to_json() for e in list(self._inflight.values()) if e.record.tokens]

    # ------------------------------------------------------------------ partial rollouts for checkpoints

    def _listen(self, route: Optional[Route]) -> None:
        """Start answering the queue's requests for partial rollouts (once, on the replica's loop):
        the route names the run's queue."""
        if self._listening is None and route is not None:
            self._listening = asyncio.ensure_future(self._answer_partials(self._queue(route)))

    async def _answer_partials(self, queue: Any) -> None:
        import ray.exceptions

        seen = -1  # answer the current epoch at once: harmless, and it registers this replica
        while True:
            try:
                epoch = await queue.partials_wanted.remote(self._replica_id, seen)
                if epoch > seen:
                    seen = epoch
                    records = self.records()
                    self.partials_recorded += len(records)
                    await queue.record_partials.remote(records, epoch, self._replica_id)
            except asyncio.CancelledError:
                raise
            except ray.exceptions.RayActorError:  # the run's queue is gone: the run is over
                return
            except Exception as e:  # a record refused or a call lost: keep listening, the next checkpoint asks again
                log.warning("partial rollouts not recorded: %s", e)
                await asyncio.sleep(1.0)

    def _queue(self, route: Route) -> Any:
        if self._queue_handle is None:
            import ray

            self._queue_handle = ray.get_actor(route.queue, namespace=route.namespace)
        return self._queue_handle

    def _on_loaded(self, version: int) -> None:
        """After an in-flight load: the decision point for every group still generating."""
        for entry in list(self._inflight.values()):
            if on_weight_update(entry.oldest_version(), version, max_staleness=self.max_staleness,
                                mode=self.partial) is Decision.ABORT:
                entry.abort()

    def _follow(self) -> None:
        """Start the background task that loads each published version in flight (once, on the
        replica's event loop)."""
        if self.receiver is not None:  # broadcast: the receiver loads; each load's decision runs on this loop
            if self.receiver.on_loaded is None:
                loop = asyncio.get_running_loop()
                self.receiver.on_loaded = lambda v: loop.call_soon_threadsafe(self._on_loaded, v)
        elif self._following is None:
            self._following = asyncio.ensure_future(self.weights.follow(self._on_loaded))

    def _generate(self, prompts, params):
        with self._weights_lock:
            return self.engine.generate(prompts, params), self.engine.version

    def stats(self) -> dict:
        return {"version": self.engine.version, "weight_loads": self.weights.loads, "sync_s": self.weights.sync_s,
                "streaming": self.streaming, "partial_aborted": self.partial_aborted,
                "partials_continued": self.partials_continued, "partials_discarded": self.partials_discarded,
                "partials_recorded": self.partials_recorded,
                "sync_bytes": self.weights.sync_bytes + (self.receiver.stats.bytes if self.receiver else 0),
                "broadcast_loads": self.receiver.loads if self.receiver else 0,
                "broadcast_s": self.receiver.stats.seconds if self.receiver else 0.0,
                "sync_failures": self.weights.failures,
                # the highest resident size during a weight load over the size just before it
                "reload_resident_ratio": self.weights.max_reload_ratio}

    def check_health(self) -> None:
        self.watch.check()


class _Inflight:
    """A group being generated by the streaming engine: the version it started under, what it went
    on from (``kept``: a resumed run's record), its record so far (``kept`` plus the tokens the
    engine reported) and how to abort it."""

    def __init__(self, group_id: str, start_version: int, kept: Optional[PartialGroup] = None) -> None:
        self.start_version = int(start_version)
        self.kept = kept
        self.record = PartialGroup.from_json(kept.to_json()) if kept is not None else PartialGroup(group_id)
        self.aborted = False
        self.task: Optional[asyncio.Future] = None

    def oldest_version(self) -> int:
        """Its oldest token's version (what the bound counts: its record's first tokens, exact once
        the engine reported any); with none yet, conservatively the version it started under (it may
        have tokens the engine has not reported)."""
        oldest = self.record.oldest_version
        return self.start_version if oldest is None else oldest

    def abort(self) -> None:
        self.aborted = True
        if self.task is not None:
            self.task.cancel()


def as_generation(r: PartialResponse) -> Generation:
    """A finished partial response (``relaxrl.partial.joined`` or ``finished``) as the engine's
    ``Generation``: its tokens, behaviour log-probs and the version of each."""
    f = r.sample_fields()
    return Generation(f["response_ids"], f["behaviour_logprobs"], f["finish_reason"], f["token_versions"])


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
                                   seed=seed, report_tokens=chunk_tokens)
    from relaxrl.engines.hf_generation import StreamingHFEngine

    return StreamingHFEngine(make_generation_engine(engine, model_dir, lora=lora, dtype=dtype,
                                                    torch_threads=torch_threads, seed=seed),
                             chunk_tokens=chunk_tokens)
