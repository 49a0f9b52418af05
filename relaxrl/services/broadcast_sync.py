"""Weight sync by broadcast (``weight_sync.method=broadcast``): trainer rank 0 -> every rollout replica.

Instead of putting each version in the object store for replicas to pull, the actor broadcasts the
full weights bucket by bucket over a collective group (NCCL on GPUs, gloo on CPU) that it and all
rollout replicas join at start-up. A collective needs every member, so:

- the ``SyncCoordinator`` (a Ray actor) hands out ranks, the group's address, and the one pending
  version's bucket plan;
- every version is received by every replica, in order (the sender's broadcast of version v
  completes only when all replicas took part, so at most one version is pending);
- each replica receives in a background thread, not between requests, so an idle replica (the
  queue gate holding producers back) never stalls the trainer; it takes the whole version before
  loading it, so neither does a busy one (the trainer's broadcast never waits for a generate call
  in flight); a lock keeps weights fixed during a batch-synchronous generate call, so each batch
  still comes from a single version, while a streaming engine loads between its steps.

Full weights only (a LoRA run keeps the object store: the adapter is small). Rollout engines:
HF, or vLLM with one in-process worker (``load_state_iterator``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

import ray
import torch

from relaxrl.engines.payload import load_full_state_dict, tied_keys
from relaxrl.engines.weight_sync import SyncStats, make_group, plan_buckets, receive_weights, send_weights

log = logging.getLogger(__name__)
POLL_S = 0.005


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"weight_sync.backend must be auto, nccl or gloo, got {backend!r}")
    return backend


def group_device(backend: str) -> str:
    """Where buckets live: gloo moves CPU tensors, NCCL CUDA tensors (each process's current GPU)."""
    return "cpu" if backend == "gloo" else f"cuda:{torch.cuda.current_device()}"


def coordinator_name(run_id: str) -> str:
    return f"relaxrl-sync-{run_id}"


def sync_settings(cfg: Any, run_id: str) -> Optional[dict]:
    """The ``weight_sync`` kwargs for actor and rollout (None: the object store), checked up front."""
    from relaxrl.engines.options import SYNC_METHODS

    ws = cfg.weight_sync
    if ws.method not in SYNC_METHODS:
        raise ValueError(f"weight_sync.method must be one of {list(SYNC_METHODS)}, got {ws.method!r}")
    if ws.method == "object_store":
        return None
    if cfg.model.lora.enabled:
        raise ValueError("weight_sync.method=broadcast sends full weights; with model.lora.enabled use object_store")
    if cfg.rollout.engine == "vllm" and int(cfg.rollout.vllm.tensor_parallel_size) > 1:
        raise ValueError("weight_sync.method=broadcast supports one vLLM worker per replica (tensor_parallel_size=1)")
    if cfg.trainer.deepspeed.zero_stage == 3 and cfg.trainer.engine == "deepspeed":
        raise ValueError("weight_sync.method=broadcast needs whole parameters on rank 0 (ZeRO stage < 3)")
    resolve_backend(ws.backend)
    return {"method": "broadcast", "coordinator": coordinator_name(run_id), "backend": ws.backend,
            "bucket_mb": float(ws.bucket_mb), "world_size": 1 + int(cfg.rollout.num_replicas)}


class SyncCoordinator:
    """Ranks, the group address and the pending version's plan (a plain class run as a Ray actor)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._address: Optional[tuple[str, int]] = None
        self._next_rank = 1
        self._pending: Optional[tuple[int, list]] = None

    def register(self) -> int:
        if self._next_rank >= self.world_size:
            raise RuntimeError(
                f"weight-sync group is full ({self.world_size - 1} rollout members); a restarted replica "
                "cannot rejoin a broadcast group: use weight_sync.method=object_store for elastic rollouts"
            )
        self._next_rank += 1
        return self._next_rank - 1

    def get_world_size(self) -> int:
        return self.world_size

    def set_address(self, host: str, port: int) -> None:
        self._address = (host, port)

    def address(self) -> Optional[tuple[str, int]]:
        return self._address

    def publish(self, version: int, plan: list) -> None:
        self._pending = (version, plan)

    def pending_after(self, version: int) -> Optional[tuple[int, list]]:
        if self._pending is None or self._pending[0] <= version:
            return None
        return self._pending


class BroadcastSender:
    """Rank 0, inside the actor replica: forms the group (in the background) and sends each version."""

    def __init__(self, coordinator: Any, backend: str, bucket_mb: float) -> None:
        from relaxrl.engines.deepspeed_trainer import free_port

        self.coordinator = coordinator
        self.backend = resolve_backend(backend)
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.device = group_device(self.backend)
        host, port = ray.util.get_node_ip_address(), free_port()
        ray.get(coordinator.set_address.remote(host, port))
        self._broadcast = None
        self._error: Optional[BaseException] = None
        self._joined = threading.Thread(target=self._join, args=(host, port), daemon=True)
        self._joined.start()

    def _join(self, host: str, port: int) -> None:
        try:
            size = ray.get(self.coordinator.get_world_size.remote())
            self._broadcast = make_group(self.backend, host, port, 0, size, self.device)
        except BaseException as e:  # surfaced on the next send
            self._error = e

    def send(self, model: torch.nn.Module, version: int) -> SyncStats:
        """Broadcast ``model``'s full weights as ``version``; blocks until every replica received it."""
        self._joined.join()
        if self._error is not None:
            raise RuntimeError(f"weight-sync group did not form: {self._error}") from self._error
        tied = tied_keys(model)
        state = {k: v for k, v in model.state_dict().items() if k not in tied}
        plan = plan_buckets(state, self.bucket_bytes)
        ray.get(self.coordinator.publish.remote(int(version), plan))
        return send_weights(state, plan, self._broadcast, self.device)


class BroadcastReceiver:
    """One rollout replica: joins the group, then receives every version into ``engine`` under ``lock``."""

    def __init__(self, engine: Any, coordinator: Any, backend: str, lock: threading.Lock) -> None:
        self.engine = engine
        self.coordinator = coordinator
        self.backend = resolve_backend(backend)
        self.lock = lock
        self.device = group_device(self.backend)
        self.rank = ray.get(coordinator.register.remote())
        self.stats = SyncStats()
        self.loads = 0
        self.error: Optional[BaseException] = None
        # Called with each version once it is loaded, on the receiver's thread (a streaming rollout
        # decides there what the generations in flight do: relaxrl.partial).
        self.on_loaded: Optional[Any] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="weight-receiver")
        self._thread.start()

    def _run(self) -> None:
        try:
            address = None
            while address is None and not self._stop.is_set():
                address = ray.get(self.coordinator.address.remote())
                time.sleep(POLL_S if address is None else 0)
            size = ray.get(self.coordinator.get_world_size.remote())
            broadcast = make_group(self.backend, address[0], address[1], self.rank, size, self.device)
            while not self._stop.is_set():
                pending = ray.get(self.coordinator.pending_after.remote(self.engine.version))
                if pending is None:
                    time.sleep(POLL_S)
                    continue
                version, plan = pending
                start = time.perf_counter()
                # Take the whole version first, then load: the trainer's broadcast completes without
                # waiting for the generate call in flight (which holds the lock on the batch path;
                # a streaming engine loads between its steps). Costs one received copy until loaded.
                received = list(receive_weights(plan, broadcast, self.device))
                self.stats.receive_seconds += time.perf_counter() - start
                with self.lock:
                    load_received(self.engine, received, version)
                del received
                if self.on_loaded is not None:
                    self.on_loaded(int(version))
                self.stats.seconds += time.perf_counter() - start
                self.stats.bytes += sum(b.nbytes for b in plan)
                self.stats.buckets += len(plan)
                self.loads += 1
        except BaseException as e:  # the replica reports it on its next request
            log.exception("weight receiver stopped")
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"weight receiver failed: {self.error}") from self.error


def load_received(engine: Any, tensors, version: int) -> None:
    """Load broadcast full weights into a generation engine and adopt ``version``."""
    if getattr(engine, "lora_on", False):
        raise ValueError("weight_sync.method=broadcast carries full weights; LoRA runs use object_store")
    if hasattr(engine, "load_state_iterator"):  # vLLM, one in-process worker
        engine.load_state_iterator(tensors, version)
        return
    with torch.no_grad():
        load_full_state_dict(engine.model, dict(tensors))
    engine.version = int(version)
