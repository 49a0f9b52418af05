"""Bucketed weight broadcast from trainer rank 0 to generation workers (the GPU weight-sync path).

Instead of one collective per tensor (hundreds of small NCCL calls), tensors are packed into flat
buckets of at most ``bucket_bytes``, one dtype per bucket, and each bucket is broadcast once. The
plan (names, shapes, offsets) is small and travels separately (e.g. through the object store); the
receiver allocates each bucket, receives it and yields ``(name, tensor)`` views for the engine's
in-place loader.

``broadcast`` is any in-place "broadcast this tensor from the source" callable, so the same code
runs over NCCL (vLLM's ``PyNcclCommunicator`` on a stateless group, see ``nccl_group``), a
``torch.distributed`` group (gloo on CPU in the tests), or a Ray collective group.
"""

from __future__ import annotations

import time
from datetime import timedelta
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

Broadcast = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, inside the bucket
    numel: int


@dataclass(frozen=True)
class Bucket:
    dtype: str  # e.g. "float32", "bfloat16"
    entries: tuple[Entry, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class SyncStats:
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    receive_seconds: float = 0.0  # receiver only: of ``seconds``, the time the sender was in the collective

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-12) / 1e9


def plan_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Buckets in state-dict order, one dtype each, at most ``bucket_bytes`` (a larger tensor gets a
    bucket of its own). Deterministic: sender and receiver agree on the layout from the plan alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    open_: dict[str, list[Entry]] = {}
    sizes: dict[str, int] = {}
    out: list[Bucket] = []

    def close(dtype: str) -> None:
        if open_.get(dtype):
            out.append(Bucket(dtype, tuple(open_[dtype]), sizes[dtype]))
        open_[dtype], sizes[dtype] = [], 0

    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        entries = open_.setdefault(dtype, [])
        sizes.setdefault(dtype, 0)
        if entries and (sizes[dtype] + t.numel()) * t.element_size() > bucket_bytes:
            close(dtype)
        open_[dtype].append(Entry(name, tuple(t.shape), sizes[dtype], t.numel()))
        sizes[dtype] += t.numel()
    for dtype in list(open_):
        close(dtype)
    return out


def pack_bucket(bucket: Bucket, state: Mapping[str, torch.Tensor], device: torch.device | str) -> torch.Tensor:
    flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=device)
    for e in bucket.entries:
        flat[e.offset : e.offset + e.numel].copy_(state[e.name].detach().reshape(-1))
    return flat


def unpack_bucket(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(e.name, flat[e.offset : e.offset + e.numel].view(e.shape)) for e in bucket.entries]


def send_weights(
    state: Mapping[str, torch.Tensor], plan: Sequence[Bucket], broadcast: Broadcast, device: torch.device | str
) -> SyncStats:
    """Sender side: pack and broadcast every bucket of ``plan``; returns bytes, buckets, seconds."""
    stats = SyncStats()
    start = time.perf_counter()
    for bucket in plan:
        broadcast(pack_bucket(bucket, state, device))
        stats.bytes += bucket.nbytes
        stats.buckets += 1
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - start
    return stats


def receive_weights(
    plan: Sequence[Bucket], broadcast: Broadcast, device: torch.device | str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: ``(name, tensor)`` for every entry, bucket by bucket (feed to a loader)."""
    for bucket in plan:
        flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=device)
        broadcast(flat)
        yield from unpack_bucket(bucket, flat)


def torch_dist_broadcast(src: int = 0, group=None) -> Broadcast:
    """A ``Broadcast`` over a ``torch.distributed`` group (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    return lambda t: dist.broadcast(t, src=src, group=group)


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0) -> Broadcast:
    """A ``Broadcast`` over a standalone gloo group (its own TCP store, rank 0 hosts it), independent of
    any ``torch.distributed`` world the process is already in (e.g. DeepSpeed's). Blocks until all
    ``world_size`` members joined. CPU tensors."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    group = dist.ProcessGroupGloo(store, rank, world_size, timeout)

    def broadcast(t: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        group.broadcast([t], opts).wait()

    return broadcast


def make_group(backend: str, host: str, port: int, rank: int, world_size: int, device: torch.device | str) -> Broadcast:
    """``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors, through vLLM's PyNccl)."""
    if backend == "gloo":
        return gloo_group(host, port, rank, world_size)
    if backend == "nccl":
        return nccl_group(host, port, rank, world_size, device)
    raise ValueError(f"unknown weight-sync backend {backend!r}; valid: ['gloo', 'nccl']")


def nccl_group(host: str, port: int, rank: int, world_size: int, device: torch.device | str) -> Broadcast:
    """A ``Broadcast`` over NCCL between processes that share no ``torch.distributed`` world (trainer
    rank 0 = rank 0; each vLLM worker = 1..n), through vLLM's stateless group and PyNccl.
    GPU only; needs vllm on both sides."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    comm = PyNcclCommunicator(pg, device=device)
    return lambda t: comm.broadcast(t, src=0, stream=torch.cuda.current_stream())
