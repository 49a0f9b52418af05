"""Actor role: owns the trainer engine, runs one optimizer step per queue batch, publishes weights."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any, Optional, Union

import ray
from ray import serve

from relaxrl.ledger import TrainedLedger
from relaxrl.metrics import info_means
from relaxrl.queue import BatchRequest, TrainBatch
from relaxrl.sample import Sample, collate
from relaxrl.services.common import pin_cpus, quiet_replica_logs, set_threads


@serve.deployment(max_ongoing_requests=4)
class Actor:
    def __init__(
        self,
        model_dir: str,
        *,
        algorithm: dict,
        trainer: dict,
        lora: Optional[dict] = None,
        dtype: str = "auto",
        train_dtype: str = "float32",
        temperature: float = 1.0,
        seed: int = 0,
        store_name: Optional[str] = None,
        queue_name: Optional[str] = None,
        namespace: str = "relaxrl",
        weight_sync: Optional[dict] = None,
        hang_timeout_s: float = 600.0,
        publish_timeout_s: float = 120.0,
        weight_bucket_mb: float = 256.0,
    ) -> None:
        from relaxrl.algorithms import make_algorithm
        from relaxrl.engines.factory import make_trainer_engine
        from relaxrl.faults import RequestWatch
        from relaxrl.models.loading import load_tokenizer

        quiet_replica_logs()
        pin_cpus(trainer.get("cpus") or ())  # trainer.cpus: the other roles keep off them
        set_threads(trainer.get("torch_threads", 1))
        self.algorithm = make_algorithm(algorithm)
        engine_kwargs = dict(
            dtype=dtype,
            train_dtype=train_dtype,
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
        updates = int(trainer.get("mini_batches", 1)) * int(trainer.get("ppo_epochs", 1))
        if engine == "torch":
            engine_kwargs.update({k: trainer[k] for k in ("max_tokens_per_micro_batch", "mini_batches", "ppo_epochs")
                                  if k in trainer})
        # Several updates per step: each mini-batch is prepared on its own, and the decoupled
        # objective is anchored on the step's starting policy (engine.train_step).
        self._step_kwargs = ({"prepare": self.algorithm.prepare,
                              "proximal": bool(getattr(self.algorithm, "needs_proximal", False))}
                             if updates > 1 else {})
        if int(trainer.get("num_ranks", 1)) > 1:  # data-parallel ranks in this replica's placement group
            from relaxrl.services.trainer_group import TrainerGroup

            self.engine = TrainerGroup(engine, model_dir, int(trainer["num_ranks"]), engine_kwargs)
        else:
            self.engine = make_trainer_engine(engine, model_dir, **engine_kwargs)
        self.pad_id = load_tokenizer(model_dir).pad_token_id
        self.store = ray.get_actor(store_name, namespace=namespace) if store_name else None
        self.queue = ray.get_actor(queue_name, namespace=namespace) if queue_name else None
        self.sender = None
        if weight_sync and weight_sync.get("method") == "broadcast":
            from relaxrl.services.broadcast_sync import BroadcastSender

            coordinator = ray.get_actor(weight_sync["coordinator"], namespace=namespace)
            self.sender = BroadcastSender(coordinator, weight_sync["backend"], weight_sync["bucket_mb"])
        self.trained = TrainedLedger()  # what was trained, in memory bounded by the groups in flight
        self.trained_count = 0  # samples trained on by this actor (and the runs it resumed)
        self.watch = RequestWatch(hang_timeout_s)
        self.publish_timeout_s = publish_timeout_s
        self.bucket_bytes = max(1, int(weight_bucket_mb * 2**20))  # a publication's parts: see split_payload
        self._turn = asyncio.Condition()  # steps train one at a time, in version order
        self._arrived: Counter = Counter()  # expected versions of the steps here, not yet training
        self._training = False
        self._publishing: Optional[asyncio.Future] = None  # the newest publication; the next one waits for it

    async def train_step(self, batch: Union[BatchRequest, list[Any]], expect_version: Optional[int] = None) -> dict:
        """One step on a batch: asked from the queue here (``BatchRequest``), so it comes straight
        from the queue to the trainer, or the samples behind ``[ObjectRef]``. Returns metrics once the
        new weights are published.

        ``expect_version``: the version this step trains from. The driver may send step k+1 while
        step k still trains: it fetches and collates its batch meanwhile and trains when the
        version reaches ``expect_version``. A replica Serve restarted from the initial weights
        refuses to train rather than silently start over."""
        # Counted at once, before the batch is asked for: the queue serves batch requests in version
        # order, so by the time a step has its batch, the step before it is counted here.
        self._arrived[expect_version] += 1
        try:
            samples, closed_below = await self._fetch(batch)
            if not samples:
                raise ValueError("train_step got an empty batch")
            # An algorithm with its own data store (DAgger's labels) picks the rows from the queue's
            # samples in step order, so under the turn; others collate while the step before trains.
            rows_of = getattr(self.algorithm, "training_rows", None)
            collated = None if rows_of else await asyncio.to_thread(collate, samples, self.pad_id)
            async with self._turn:
                await self._turn.wait_for(lambda: self._my_turn(expect_version))
                self._training = True
        finally:
            async with self._turn:  # a step that fails before training lets the next one see it
                self._arrived[expect_version] -= 1
                self._turn.notify_all()
        try:
            duplicated = self.trained.duplicates(s.uid for s in samples)
            if duplicated:
                raise RuntimeError(f"samples trained twice: {duplicated[:5]}")
            self.trained.record((s.uid for s in samples), closed_below)
            self.trained_count += len(samples)
            if rows_of is not None:
                collated = collate(rows_of(samples), self.pad_id)
            trained_on = self.engine.version
            start = time.time()
            batch = self.algorithm.prepare(collated)
            metrics, end, payload = await asyncio.to_thread(self.watch.wrap(self._train_then_copy), batch)
            publish_start = end  # the copy made in the training thread is the publication's start
            new_version = self.engine.version
            publish = await self._export(payload)
        finally:
            async with self._turn:
                self._training = False
                self._turn.notify_all()
        publish_bytes = await publish
        publish_end = time.time()
        rewards = [s.reward for s in samples]
        staleness = [trained_on - s.policy_version for s in samples]
        return {
            **metrics,
            **{f"algo/{k}": v for k, v in batch.scalars.items()},
            "version": new_version,
            "samples": len(samples),
            "reward_mean": sum(rewards) / len(rewards),
            "staleness_mean": sum(staleness) / len(staleness),
            "staleness_max": max(staleness),
            "response_len_mean": sum(len(s.response_ids) for s in samples) / len(samples),
            **info_means([s.reward_info for s in samples]),
            "train_start": start,
            "train_end": end,
            "publish_start": publish_start,
            "publish_end": publish_end,
            "publish_s": publish_end - publish_start,
            "publish_bytes": publish_bytes,
            "trained": [[s.uid, s.policy_version] for s in samples],  # the audit log, in training order
        }

    async def _fetch(self, batch: Union[BatchRequest, list[Any]]) -> tuple[list[Sample], Optional[int]]:
        """The batch's samples (the queue serves batch requests in train-version order) and, from
        the queue, the sequence number below which every group is closed (None otherwise)."""
        if not isinstance(batch, BatchRequest):
            return await batch[0], None
        if self.queue is None:
            raise RuntimeError("train_step got a BatchRequest, but this actor was started without a queue_name")
        got: Optional[TrainBatch] = await self.queue.get_train_batch.remote(batch.num_groups, batch.timeout_s,
                                                                            batch.train_version)
        return ([], None) if got is None else (got.samples, got.closed_below)

    def _my_turn(self, expect_version: Optional[int]) -> bool:
        """True when this step may train; raises when it never will (lost state, out of order)."""
        from relaxrl.faults import ReplicaStateLost

        if self._training:  # the step before is training: wait for it
            return False
        v = self.engine.version
        if expect_version is None or v == expect_version:
            return True
        if v < expect_version and self._arrived[v] > 0:  # the step training from v is here, not yet training
            return False
        raise ReplicaStateLost(f"the trainer is at version {v}, this step expects {expect_version}: the step before "
                               "it failed, or this replica was restarted and lost the training state")

    def _train_then_copy(self, batch: Any) -> tuple[dict, float, Optional[Any]]:
        """The optimizer step, then the new weights copied out for the store in the same thread: one
        hand-off between threads per step, not two (both lie on the synchronous critical path)."""
        metrics = self.engine.train_step(batch, self.algorithm.loss, **self._step_kwargs)
        end = time.time()
        copied = self.engine.export_weights() if self._publishes_to_store else None
        metrics["export_s"] = time.time() - end  # the copy the next step must wait for; the put overlaps it
        return metrics, end, copied

    @property
    def _publishes_to_store(self) -> bool:
        """New weights go out through the weight store (else by broadcast, or not at all)."""
        return self.sender is None and self.store is not None

    async def _export(self, payload: Optional[Any] = None) -> "asyncio.Future[int]":
        """Copy the new weights out of the model (under the step's turn, so the next step cannot
        change them first; ``payload``: copied already) and start publishing them; returns the
        publication (its byte count). Publications run in version order, each after the one before."""
        from relaxrl.engines.payload import split_payload
        from relaxrl.weights import publish_with_timeout

        if self.sender is not None:  # every rollout replica receives this version before we go on
            stats = await asyncio.to_thread(self.sender.send, self.engine.model, self.engine.version)
            return _done(stats.bytes)
        if not self._publishes_to_store:
            return _done(0)
        if payload is None:
            payload = await asyncio.to_thread(self.engine.export_weights)
        previous = self._publishing

        async def publish() -> int:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)  # its own step reports a failure
            # Parts, so a replica holds one at a time; put from a thread: the copy into the object
            # store does not hold up this replica's event loop.
            refs = await asyncio.to_thread(lambda: [ray.put(p) for p in split_payload(payload, self.bucket_bytes)])
            await publish_with_timeout(self.store, payload.version, refs, payload.kind, payload.nbytes,
                                       self.publish_timeout_s)
            return payload.nbytes

        # A task, not a coroutine: it runs even if this request is cancelled, so the next never waits on it forever.
        self._publishing = asyncio.ensure_future(publish())
        return self._publishing

    async def _publish(self) -> int:
        return await (await self._export())

    async def save_checkpoint(self, path: str) -> str:
        """Engine state plus what the actor keeps: its ledger of trained samples (so none is trained
        twice after a resume; a few integers per group in flight, not a uid per sample) and the
        Python/NumPy RNG states (torch's is in the engine's state)."""
        os.makedirs(path, exist_ok=True)
        await asyncio.to_thread(self.engine.save_checkpoint, path)
        state = {"trained": self.trained.state(), "trained_count": self.trained_count,
                 "python_rng": _jsonable(random.getstate()), "numpy_rng": _numpy_rng_state()}
        if hasattr(self.algorithm, "state_dict"):  # e.g. DAgger's aggregated labels
            state["algorithm"] = self.algorithm.state_dict()
        with open(os.path.join(path, ACTOR_STATE), "w") as f:
            json.dump(state, f)
        return path

    async def load_checkpoint(self, path: str) -> int:
        """Restore ``save_checkpoint``'s state and publish the restored weights; returns the version."""
        await asyncio.to_thread(self.engine.load_checkpoint, path)
        with open(os.path.join(path, ACTOR_STATE)) as f:
            state = json.load(f)
        self.trained = (TrainedLedger.from_state(state["trained"]) if "trained" in state
                        else TrainedLedger.from_uids(state["trained_uids"]))  # a checkpoint from before the ledger
        self.trained_count = int(state["trained_count"])
        if "algorithm" in state:
            self.algorithm.load_state_dict(state["algorithm"])
        random.setstate(_tupled(state["python_rng"]))
        _set_numpy_rng_state(state["numpy_rng"])
        await self._publish()
        return self.engine.version

    def ledger(self) -> dict:
        return {"trained_count": self.trained_count, "distinct_uids": self.trained.count,
                "version": self.engine.version}

    def check_health(self) -> None:
        self.watch.check()

    def export_weights(self):
        return self.engine.export_weights()


ACTOR_STATE = "actor_state.json"


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _numpy_rng_state() -> list:
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _set_numpy_rng_state(state: list) -> None:
    import numpy as np

    name, keys, pos, has_gauss, gauss = state
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _done(value: int) -> "asyncio.Future[int]":
    done = asyncio.get_running_loop().create_future()
    done.set_result(value)
    return done
