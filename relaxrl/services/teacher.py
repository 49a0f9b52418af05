"""Teacher role: scores the student's tokens under a named checkpoint (reference or teacher).

Log-probs are taken at the rollout's temperature (``log_softmax(logits / T)``), the distribution
the rollout sampled from and the trainer scores with, so a KL to the reference or a distillation
advantage compares like with like (T <= 0, greedy, means 1, as in the engines).
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.sample import Sample
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import keep_off_cpus, quiet_replica_logs, set_threads

_FIELDS = ("ref_logprobs", "teacher_logprobs")


def score_samples(engine: Any, samples: Sequence[Sample], field: str, *, temperature: float,
                  top_k: int = 0) -> list[Sample]:
    """``samples`` with ``field`` (and, for teacher log-probs, the top-k alternatives) filled in by
    ``engine.score`` at ``temperature``: the one scoring step of both teacher roles."""
    if field not in _FIELDS:
        raise ValueError(f"teacher field must be one of {_FIELDS}, got {field!r}")
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    lens = [len(s.prompt_ids) for s in samples]
    scored = engine.score(seqs, lens, top_k, temperature=temperature)
    out = []
    for i, s in enumerate(samples):
        extra = {}
        if field == "teacher_logprobs" and scored.topk_ids is not None:
            extra = {"teacher_topk_ids": scored.topk_ids[i], "teacher_topk_logprobs": scored.topk_logprobs[i]}
        out.append(s.replace(**{field: scored.logprobs[i]}, **extra))
    return out


@serve.deployment(max_ongoing_requests=64)
class Teacher:
    def __init__(self, checkpoints: dict[str, str], *, temperature: float, dtype: str = "float32",
                 torch_threads: int = 1, top_k: int = 0, hang_timeout_s: float = 600.0,
                 avoid_cpus: Sequence[int] = ()) -> None:
        """``temperature``: rollout.temperature, required so that no caller scores at T=1 by default."""
        from relaxrl.faults import RequestWatch

        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)  # the trainer's CPUs (trainer.cpus)
        self.watch = RequestWatch(hang_timeout_s)
        set_threads(torch_threads)
        self.paths = dict(checkpoints)
        self.dtype = dtype
        self.torch_threads = torch_threads
        self.top_k = top_k
        self.temperature = temperature
        self._engines: dict[str, object] = {}  # loaded lazily, by checkpoint name
        self.forwarder = Forwarder()

    def _engine(self, name: str):
        if name not in self.paths:
            raise KeyError(f"teacher checkpoint {name!r} is not registered; known: {sorted(self.paths)}")
        if name not in self._engines:
            from relaxrl.engines.hf_generation import HFGenerationEngine

            self._engines[name] = HFGenerationEngine.from_pretrained(
                self.paths[name], dtype=self.dtype, torch_threads=self.torch_threads, role=f"teacher {name!r}"
            )
        return self._engines[name]

    async def score(self, samples: list[Sample], name: str = "ref", field: str = "ref_logprobs",
                    top_k: Optional[int] = None, route: Optional[Route] = None) -> Any:
        """``samples`` with ``field`` filled from checkpoint ``name``; with a ``route`` they go on to
        its next stop (see ``Rollout.generate``)."""
        if field not in _FIELDS:
            raise ValueError(f"teacher field must be one of {_FIELDS}, got {field!r}")
        k = self.top_k if top_k is None else top_k
        out = await asyncio.to_thread(self.watch.wrap(score_samples), self._engine(name), samples, field,
                                      temperature=self.temperature, top_k=k)
        return await self.forwarder.forward(out, route)

    def check_health(self) -> None:
        self.watch.check()

    async def act(self, state_ids: list[int], max_new_tokens: int, name: str = "teacher",
                  temperature: float = 0.0):
        """The checkpoint's action for one state (greedy by default), for episode teachers: a label,
        a target token sequence, so its own log-probs are not used (see DAgger's CE at T=1)."""
        from relaxrl.engines.base import SamplingParams

        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        (gen,) = await asyncio.to_thread(self._engine(name).generate, [list(state_ids)], params)
        return gen
