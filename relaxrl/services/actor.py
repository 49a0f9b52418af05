"""Actor role: owns the trainer engine, runs one optimizer step per queue batch, publishes weights."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Optional

import ray
from ray import serve

from relaxrl.sample import Sample, collate
from relaxrl.services.common import quiet_replica_logs, set_threads


@serve.deployment(max_ongoing_requests=4)
class Actor:
    def __init__(
        self,
        model_dir: str,
        *,
        algorithm: dict,
        trainer: dict,
        lora: Optional[dict] = None,
        dtype: str = "float32",
        temperature: float = 1.0,
        seed: int = 0,
        store_name: Optional[str] = None,
        namespace: str = "relaxrl",
        weight_sync: Optional[dict] = None,
    ) -> None:
        from relaxrl.algorithms import make_algorithm
        from relaxrl.engines.factory import make_trainer_engine
        from relaxrl.models.loading import load_tokenizer

        quiet_replica_logs()
        set_threads(trainer.get("torch_threads", 1))
        self.algorithm = make_algorithm(algorithm)
        engine_kwargs = dict(
            dtype=dtype,
            lr=trainer["lr"],
            weight_decay=trainer["weight_decay"],
            beta1=trainer["beta1"],
            beta2=trainer["beta2"],
            max_grad_norm=trainer["max_grad_norm"],
            warmup_steps=trainer["warmup_steps"],
            micro_batch_size=trainer["micro_batch_size"],
            temperature=temperature,
            lora=lora,
            seed=seed,
            torch_threads=trainer.get("torch_threads", 1),
        )
        engine = trainer.get("engine", "torch")
        if engine == "deepspeed":
            engine_kwargs["deepspeed"] = trainer.get("deepspeed")
        if int(trainer.get("num_ranks", 1)) > 1:  # data-parallel ranks in this replica's placement group
            from relaxrl.services.trainer_group import TrainerGroup

            self.engine = TrainerGroup(engine, model_dir, int(trainer["num_ranks"]), engine_kwargs)
        else:
            self.engine = make_trainer_engine(engine, model_dir, **engine_kwargs)
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        self.store = ray.get_actor(store_name, namespace=namespace) if store_name else None
        self.sender = None
        if weight_sync and weight_sync.get("method") == "broadcast":
            from relaxrl.services.broadcast_sync import BroadcastSender

            coordinator = ray.get_actor(weight_sync["coordinator"], namespace=namespace)
            self.sender = BroadcastSender(coordinator, weight_sync["backend"], weight_sync["bucket_mb"])
        self.trained_uids: set[str] = set()

    async def train_step(self, batch_ref: list[Any]) -> dict:
        """One step on the queue batch behind ``batch_ref`` (``[ObjectRef]``: fetched here, so the
        samples never pass through the driver). Returns metrics; weights are published first."""
        samples: list[Sample] = await batch_ref[0]
        if not samples:
            raise ValueError("train_step got an empty batch")
        duplicated = [s.uid for s in samples if s.uid in self.trained_uids]
        if duplicated:
            raise RuntimeError(f"samples trained twice: {duplicated[:5]}")
        self.trained_uids.update(s.uid for s in samples)
        trained_on = self.engine.version
        start = time.time()
        batch = self.algorithm.prepare(collate(samples, self.pad_id))
        metrics = await asyncio.to_thread(self.engine.train_step, batch, self.algorithm.loss)
        end = time.time()
        publish_start = time.time()
        publish_bytes = await self._publish()
        publish_end = time.time()
        rewards = [s.reward for s in samples]
        staleness = [trained_on - s.policy_version for s in samples]
        return {
            **metrics,
            **{f"algo/{k}": v for k, v in batch.scalars.items()},
            "version": self.engine.version,
            "samples": len(samples),
            "reward_mean": sum(rewards) / len(rewards),
            "staleness_mean": sum(staleness) / len(staleness),
            "staleness_max": max(staleness),
            "response_len_mean": sum(len(s.response_ids) for s in samples) / len(samples),
            "train_start": start,
            "train_end": end,
            "publish_start": publish_start,
            "publish_end": publish_end,
            "publish_s": publish_end - publish_start,
            "publish_bytes": publish_bytes,
        }

    async def _publish(self) -> int:
        if self.sender is not None:  # every rollout replica receives this version before we go on
            stats = await asyncio.to_thread(self.sender.send, self.engine.model, self.engine.version)
            return stats.bytes
        if self.store is None:
            return 0
        payload = self.engine.export_weights()
        ref = ray.put(payload)
        await self.store.publish.remote(payload.version, [ref], payload.kind, payload.nbytes)
        return payload.nbytes

    async def save_checkpoint(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        await asyncio.to_thread(self.engine.save_checkpoint, path)
        return path

    def export_weights(self):
        return self.engine.export_weights()
