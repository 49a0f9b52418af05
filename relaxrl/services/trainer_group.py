"""Data-parallel trainer ranks in the actor replica's placement group (``num_ranks > 1``).

Rank 0 is the engine inside the actor replica (bundle 0); ranks 1..n-1 are Ray actors pinned to
bundles 1..n-1 of the replica's placement group (see ``services/placement.py``). All ranks join one
``torch.distributed`` group (NCCL on GPUs, gloo on CPU), get the whole batch and train on their
share of its rows (``engines/microbatch.rank_micro_batches``: as many micro-batches on every rank);
the engine sums (torch) or averages (DeepSpeed) the gradients over the ranks and reports the whole
batch's loss and metrics on every rank. ``TrainerGroup`` has the trainer-engine methods, so the
actor uses it like a single engine.

DeepSpeed joins the group itself; for the torch engine it is joined here, before the engine is
built (the engine reads its rank and world size from it). The torch engine's data parallelism is
tested at the engine level (two gloo processes, ``tests/engines/test_data_parallel.py``), not yet
through this class; ``services/placement.py`` still gives ``num_ranks > 1`` to DeepSpeed only.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relaxrl.engines.factory import make_trainer_engine


def _dist_env(rank: int, world_size: int, addr: str, port: int) -> dict[str, str]:
    # Each rank sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so its local rank is 0.
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def _build_rank(env: dict[str, str], engine: str, model_dir: str, kwargs: dict) -> Any:
    """This rank's engine, in the group ``env`` describes (joined here for the torch engine)."""
    os.environ.update(env)
    if engine == "torch":
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    return make_trainer_engine(engine, model_dir, **kwargs)


class TrainerRank:
    """Rank ``r >= 1``: builds the same engine and mirrors rank 0's calls."""

    def __init__(self, env: dict[str, str], engine: str, model_dir: str, kwargs: dict) -> None:
        self.engine = _build_rank(env, engine, model_dir, kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.engine, method)(*args, **kwargs)


class TrainerGroup:
    """Trainer-engine interface over ``world_size`` ranks; weights and metrics come from rank 0."""

    def __init__(self, engine: str, model_dir: str, world_size: int, kwargs: dict) -> None:
        from relaxrl.engines.deepspeed_trainer import free_port

        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < world_size:
            raise RuntimeError(
                f"trainer.num_ranks={world_size} needs the actor replica to own a placement group with "
                f"{world_size} bundles (launch.py sets it from trainer.num_ranks)"
            )
        addr, port = ray.util.get_node_ip_address(), free_port()
        bundle = pg.bundle_specs[0]
        rank_cls = ray.remote(TrainerRank)
        self.ranks = [
            rank_cls.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote(_dist_env(r, world_size, addr, port), engine, model_dir, kwargs)
            for r in range(1, world_size)
        ]
        self.engine = _build_rank(_dist_env(0, world_size, addr, port), engine, model_dir, kwargs)  # rendezvous
        self.world_size = world_size
        self.gather_on_export = int((kwargs.get("deepspeed") or {}).get("zero_stage", 0)) == 3

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def model(self):
        return self.engine.model

    def _all(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on every rank at once (collectives need all of them); rank 0's result."""
        refs = [r.call.remote(method, *args, **kwargs) for r in self.ranks]
        out = getattr(self.engine, method)(*args, **kwargs)
        others = ray.get(refs)
        return out, others

    def train_step(self, batch, loss_fn, **kwargs: Any) -> dict[str, float]:
        """``kwargs``: the torch engine's ``prepare``/``proximal`` (PPO mini-batches), passed on as given.
        The engines sum the loss and metrics over the ranks: rank 0's are the whole batch's."""
        return self._all("train_step", batch, loss_fn, **kwargs)[0]

    def logprobs(self, batch):
        return self.engine.logprobs(batch)

    def export_weights(self):
        # ZeRO-3 gathers the sharded parameters, a collective; otherwise rank 0 holds them all.
        return self._all("export_weights")[0] if self.gather_on_export else self.engine.export_weights()

    def save_checkpoint(self, path: str) -> None:
        self._all("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self._all("load_checkpoint", path)
