"""GPU placement of the role replicas: Ray placement groups from the config's GPUs per role.

Serve creates one placement group per replica from ``placement_group_bundles``; the replica runs in
bundle 0 and owns the group, so the GPU workers it starts (vLLM tensor-parallel workers, trainer
ranks 1..n-1) land in the other bundles and are freed with the replica. These functions only build
the Serve options (plain dicts); launch.py applies them.
"""

from __future__ import annotations

from typing import Any

from relaxrl.engines.options import GENERATION_ENGINES, TRAINER_ENGINES, check_engine


def rollout_options(rollout: Any) -> dict:
    """Serve options of one rollout replica.

    HF, or vLLM with one GPU: the replica itself holds ``num_gpus``. vLLM with tensor parallelism
    ``tp > 1``: bundle 0 holds the replica (CPU only), bundles 1..tp one GPU each for vLLM's Ray
    workers, packed on one node (tensor parallelism needs NVLink/PCIe peers, not the network).
    """
    check_engine("rollout", rollout.engine, GENERATION_ENGINES)
    cpus, gpus = float(rollout.num_cpus), float(rollout.num_gpus)
    tp = int(rollout.vllm.tensor_parallel_size) if rollout.engine == "vllm" else 1
    if tp <= 1:
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if gpus not in (0.0, 1.0):
        raise ValueError(
            f"rollout.num_gpus={gpus} with rollout.vllm.tensor_parallel_size={tp}: each tensor-parallel "
            "worker takes one whole GPU (set rollout.num_gpus=1; the replica uses tp GPUs)"
        )
    return {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": 0.0},
        "placement_group_bundles": [{"CPU": cpus}] + [{"GPU": 1.0, "CPU": 1.0} for _ in range(tp)],
        "placement_group_strategy": "STRICT_PACK",
    }


def trainer_options(trainer: Any) -> dict:
    """Serve options of the actor replica: one bundle per data-parallel rank (rank 0 = the replica)."""
    check_engine("trainer", trainer.engine, TRAINER_ENGINES)
    cpus, gpus, ranks = float(trainer.num_cpus), float(trainer.num_gpus), int(trainer.num_ranks)
    if ranks < 1:
        raise ValueError(f"trainer.num_ranks must be >= 1, got {ranks}")
    if ranks > 1 and trainer.engine != "deepspeed":
        raise ValueError(f"trainer.num_ranks={ranks} needs trainer.engine=deepspeed (the torch engine is single-rank)")
    options: dict = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if ranks > 1:
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
        options["placement_group_bundles"] = [dict(bundle) for _ in range(ranks)]
        options["placement_group_strategy"] = "PACK"  # same node where possible: faster all-reduce
    return options


def gpus_per_role(rollout: Any, trainer: Any, teacher: Any = None) -> dict[str, float]:
    """GPUs each role claims in total (what a cluster must offer), for logs and the recipe's check."""
    tp = int(rollout.vllm.tensor_parallel_size) if rollout.engine == "vllm" else 1
    per_rollout = tp if tp > 1 else float(rollout.num_gpus)
    out = {
        "rollout": per_rollout * int(rollout.num_replicas),
        "trainer": float(trainer.num_gpus) * int(trainer.num_ranks),
    }
    if teacher is not None:
        out["teacher"] = float(teacher.num_gpus) * int(teacher.num_replicas)
    return out
