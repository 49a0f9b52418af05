"""Rollout role: samples a group of responses per request with the newest published weights."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Optional

from ray import serve

from relaxrl.engines.base import SamplingParams
from relaxrl.sample import Sample
from relaxrl.services.common import WeightFollower, quiet_replica_logs, set_threads


@dataclass
class GroupRequest:
    group_id: str
    prompt_ids: list[int]
    n: int
    domain: str = "default"
    env: str = ""
    answer: Optional[str] = None
    seed: Optional[int] = None


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
        batch_wait_s: float = 0.005,
        hang_timeout_s: float = 600.0,
        sync_timeout_s: float = 120.0,
    ) -> None:
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.faults import RequestWatch
        from relaxrl.models.lora import LoraConfig

        quiet_replica_logs()
        set_threads(torch_threads)
        lora_cfg = LoraConfig(**lora) if lora else None
        self.engine = HFGenerationEngine.from_pretrained(
            model_dir, lora=lora_cfg, dtype=dtype, torch_threads=torch_threads
        )
        self.weights = WeightFollower(self.engine, store_name, namespace, timeout_s=sync_timeout_s)
        self.watch = RequestWatch(hang_timeout_s)
        self.sampling = sampling
        self._generate_batch.set_max_batch_size(batch_max_groups)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def generate(self, request: GroupRequest) -> list[Sample]:
        return await self._generate_batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, requests: list[GroupRequest]) -> list[list[Sample]]:
        # Weights change only between batches, so every sample of a batch has one version.
        await self.weights.sync()
        prompts = [r.prompt_ids for r in requests for _ in range(r.n)]
        seed = requests[0].seed
        params = SamplingParams(seed=seed, **self.sampling)
        start = time.time()
        gens = await asyncio.to_thread(self.watch.wrap(self.engine.generate), prompts, params)
        end = time.time()
        tok = self.engine.tokenizer
        out, i = [], 0
        for r in requests:
            group = []
            for k in range(r.n):
                g = gens[i]
                i += 1
                text_ids = g.response_ids[:-1] if g.finish_reason == "stop" else g.response_ids
                group.append(
                    Sample(
                        uid=f"{r.group_id}/{k}",
                        group_id=r.group_id,
                        index=k,
                        prompt_ids=list(r.prompt_ids),
                        domain=r.domain,
                        env=r.env,
                        answer=r.answer,
                        response_ids=g.response_ids,
                        loss_mask=[1] * len(g.response_ids),
                        behaviour_logprobs=g.logprobs,
                        policy_version=self.engine.version,
                        finish_reason=g.finish_reason,
                        response_text=tok.decode(text_ids, skip_special_tokens=True),
                        timings={"gen_start": start, "gen_end": end},
                    )
                )
            out.append(group)
        return out

    def stats(self) -> dict:
        return {"version": self.engine.version, "weight_loads": self.weights.loads, "sync_s": self.weights.sync_s,
                "sync_failures": self.weights.failures}

    def check_health(self) -> None:
        self.watch.check()
