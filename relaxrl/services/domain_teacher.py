"""Domain teacher role: scores each sample under the teacher checkpoint of the sample's own domain.

One deployment serves every domain's teacher with Serve model multiplexing: a teacher is loaded
lazily on first use (``@serve.multiplexed``, LRU-evicted beyond ``max_models`` per replica), and the
driver sends each group with ``multiplexed_model_id=<domain>`` so Serve routes it to a replica that
already holds that teacher. A request without a model id is split by the samples' domains.
Log-probs are taken at the rollout's temperature, as by the ``Teacher`` role (``score_samples``).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.sample import Sample
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import keep_off_cpus, quiet_replica_logs, set_threads
from relaxrl.services.teacher import score_samples

MAX_MODELS_PER_REPLICA = 8


@serve.deployment(max_ongoing_requests=64)
class DomainTeacher:
    def __init__(self, checkpoints: dict[str, str], *, dtype: str = "float32", torch_threads: int = 1,
                 top_k: int = 0, temperature: float, avoid_cpus: Sequence[int] = ()) -> None:
        """``temperature``: rollout.temperature, required so that no caller scores at T=1 by default."""
        if not checkpoints:
            raise ValueError("DomainTeacher needs at least one {domain: checkpoint} entry (teacher.domains)")
        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)  # the trainer's CPUs (trainer.cpus)
        set_threads(torch_threads)
        self.paths = dict(checkpoints)
        self.dtype, self.torch_threads, self.top_k, self.temperature = dtype, torch_threads, top_k, temperature
        self.loads: dict[str, int] = defaultdict(int)  # teacher loads per domain (evictions reload)
        self.forwarder = Forwarder()

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_teacher(self, domain: str):
        from relaxrl.engines.hf_generation import HFGenerationEngine

        if domain not in self.paths:
            raise KeyError(f"no teacher for domain {domain!r}; teachers: {sorted(self.paths)}")
        self.loads[domain] += 1
        return await asyncio.to_thread(
            HFGenerationEngine.from_pretrained, self.paths[domain], dtype=self.dtype, torch_threads=self.torch_threads,
            role=f"teacher of domain {domain!r}",
        )

    async def score(self, samples: list[Sample], top_k: Optional[int] = None, route: Optional[Route] = None) -> Any:
        """``samples`` with ``teacher_logprobs`` from the teacher of each one's ``domain``; with a
        ``route`` they go on to its next stop (see ``Rollout.generate``)."""
        routed = serve.get_multiplexed_model_id()
        by_domain: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            by_domain[s.domain].append(i)
        if routed and set(by_domain) - {routed}:
            raise ValueError(f"request routed to teacher {routed!r} carries samples of domains {sorted(by_domain)}")
        unknown = sorted(set(by_domain) - set(self.paths))
        if unknown:
            raise KeyError(f"no teacher for domain(s) {unknown}; teachers: {sorted(self.paths)}")
        k = self.top_k if top_k is None else top_k
        out: list[Optional[Sample]] = [None] * len(samples)
        for domain, idx in by_domain.items():
            engine = await self.get_teacher(domain)
            scored = await asyncio.to_thread(score_samples, engine, [samples[i] for i in idx], "teacher_logprobs",
                                             temperature=self.temperature, top_k=k)
            for i, s in zip(idx, scored):
                out[i] = s
        return await self.forwarder.forward(out, route)

    def stats(self) -> dict:
        return {"loads": dict(self.loads)}
