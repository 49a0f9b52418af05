"""Teacher role: scores the student's tokens under a named checkpoint (reference or teacher)."""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.sample import Sample
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import keep_off_cpus, quiet_replica_logs, set_threads

_FIELDS = ("ref_logprobs", "teacher_logprobs")


@serve.deployment(max_ongoing_requests=64)
class Teacher:
    def __init__(self, checkpoints: dict[str, str], *, dtype: str = "float32",
                 torch_threads: int = 1, top_k: int = 0, hang_timeout_s: float = 600.0,
                 avoid_cpus: Sequence[int] = ()) -> None:
        from relaxrl.faults import RequestWatch

        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)  # the trainer's CPUs (trainer.cpus)
        self.watch = RequestWatch(hang_timeout_s)
        set_threads(torch_threads)
        self.paths = dict(checkpoints)
        self.dtype = dtype
        self.torch_threads = torch_threads
        self.top_k = top_k
        self._engines: dict[str, object] = {}  # loaded lazily, by checkpoint name
        self.forwarder = Forwarder()

    def _engine(self, name: str):
        if name not in self.paths:
            raise KeyError(f"teacher checkpoint {name!r} is not registered; known: {sorted(self.paths)}")
        if name not in self._engines:
            from relaxrl.engines.hf_generation import HFGenerationEngine

            self._engines[name] = HFGenerationEngine.from_pretrained(
                self.paths[name], dtype=self.dtype, torch_threads=self.torch_threads
            )
        return self._engines[name]

    async def score(self, samples: list[Sample], name: str = "ref", field: str = "ref_logprobs",
                    top_k: Optional[int] = None, route: Optional[Route] = None) -> Any:
        """``samples`` with ``field`` filled from checkpoint ``name``; with a ``route`` they go on to
        its next stop (see ``Rollout.generate``)."""
        if field not in _FIELDS:
            raise ValueError(f"teacher field must be one of {_FIELDS}, got {field!r}")
        k = self.top_k if top_k is None else top_k
        engine = self._engine(name)
        seqs = [s.prompt_ids + s.response_ids for s in samples]
        lens = [len(s.prompt_ids) for s in samples]
        scored = await asyncio.to_thread(self.watch.wrap(engine.score), seqs, lens, k)
        out = []
        for i, s in enumerate(samples):
            extra = {}
            if field == "teacher_logprobs" and scored.topk_ids is not None:
                extra = {"teacher_topk_ids": scored.topk_ids[i], "teacher_topk_logprobs": scored.topk_logprobs[i]}
            out.append(s.replace(**{field: scored.logprobs[i]}, **extra))
        return await self.forwarder.forward(out, route)

    def check_health(self) -> None:
        self.watch.check()

    async def act(self, state_ids: list[int], max_new_tokens: int, name: str = "teacher",
                  temperature: float = 0.0):
        """The checkpoint's action for one state (greedy by default), for episode teachers."""
        from relaxrl.engines.base import SamplingParams

        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        (gen,) = await asyncio.to_thread(self._engine(name).generate, [list(state_ids)], params)
        return gen
