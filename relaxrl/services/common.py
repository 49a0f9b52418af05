"""Small pieces shared by the role deployments."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Optional, Sequence

import ray

from relaxrl.memory import PeakResident, drop_shared_pages, shared_mappings

log = logging.getLogger(__name__)


def quiet_replica_logs() -> None:
    """Serve logs every request at INFO; RL sends thousands. Keep warnings and errors, and drop the
    per-replica "Loading weights" / "Writing model shards" bars: the driver prints start-up phases."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """transformers' own tqdm bars (model loading and saving) off in this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def set_threads(n: Optional[int]) -> None:
    """Tiny models run faster on one intra-op thread per role; large ones want more."""
    if n:
        import torch

        torch.set_num_threads(int(n))
        os.environ["OMP_NUM_THREADS"] = str(n)


def check_cpus(cpus: Sequence[int], key: str = "trainer.cpus") -> None:
    """Fail early, naming the key, if ``cpus`` are not CPUs this process may run on (or leave none over)."""
    if not cpus:
        return
    have = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if have is None:
        raise ValueError(f"{key}={list(cpus)}: CPU pinning needs Linux (os.sched_setaffinity)")
    if not set(cpus) <= set(have) or set(have) <= set(cpus):
        raise ValueError(f"{key}={list(cpus)} must be a proper subset of this machine's CPUs {have}: "
                         "the other roles need at least one CPU left")


def pin_cpus(cpus: Sequence[int]) -> None:
    """Run this process (all its threads) on ``cpus`` only; nothing if empty."""
    if cpus:
        for tid in _threads():
            os.sched_setaffinity(tid, set(cpus))


def keep_off_cpus(cpus: Sequence[int]) -> Optional[set[int]]:
    """Keep this process off ``cpus`` (reserved for the trainer); returns the affinity it had
    (None if nothing changed), for ``restore_cpus``."""
    if not cpus or not hasattr(os, "sched_getaffinity"):
        return None
    before = os.sched_getaffinity(0)
    rest = before - set(cpus)
    if rest and rest != before:
        for tid in _threads():
            os.sched_setaffinity(tid, rest)
        return before
    return None


def restore_cpus(before: Optional[set[int]]) -> None:
    if before is not None:
        for tid in _threads():
            os.sched_setaffinity(tid, before)


def _threads() -> list[int]:
    """Ids of this process's threads: affinity is per thread, and Ray's run already."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


async def fetch_parts(refs: list[Any]) -> list[Any]:
    """A publication's parts (``WeightPayload``s), mapped from the object store without a copy."""
    return list(await asyncio.gather(*refs))


def released(parts: list[Any]):
    """``parts`` one at a time; once the loader asks for the next, the pages of the one before are
    given back (``relaxrl.memory.drop_shared_pages``), so a load holds one part's pages at a time."""
    mappings = shared_mappings()
    for part in parts:
        yield part
        drop_shared_pages(part.tensors.values(), mappings)


class WeightFollower:
    """Pulls the newest published weights into a generation engine between requests."""

    def __init__(self, engine: Any, store_name: Optional[str], namespace: str, timeout_s: float = 120.0) -> None:
        self.engine = engine
        self.store = ray.get_actor(store_name, namespace=namespace) if store_name else None
        self.timeout_s = timeout_s
        self.sync_s = 0.0  # time spent loading weights, for the benchmarks
        self.loads = 0
        self.sync_bytes = 0  # payload bytes loaded, for the benchmarks
        self.failures = 0
        self._known: Optional[tuple[int, list[Any]]] = None  # a newer publication wait_for saw, not yet loaded
        self.last_interval: dict[str, float] = {}  # the latest load's weights_start/weights_end
        self.last_memory: dict[str, float] = {}  # the latest load's resident size before it and its peak
        self.max_reload_ratio = 0.0  # over every load: peak resident during it / resident before it

    def _newest_seen(self) -> int:
        return max(self.engine.version, self._known[0] if self._known else -1)

    async def wait_for(self, version: int, poll_s: float = 30.0) -> None:
        """Return once weights of at least ``version`` are published (a request sent ahead of them
        waits here, outside the batch loop, so requests that can run now are not held up)."""
        if self.store is None:
            return
        while (seen := self._newest_seen()) < version:
            newer = await self.store.wait_newer.remote(seen, poll_s)
            if newer is not None and newer[0] > self._newest_seen():
                self._known = newer

    async def sync(self) -> dict[str, float]:
        """Load the newest weights if there are newer ones; returns the load's wall-clock
        interval as ``{"weights_start", "weights_end"}`` timings (empty if nothing was loaded).

        A store that fails or hangs never blocks generation: the replica keeps its weights, whose
        version each sample records (the queue enforces staleness)."""
        if self.store is None:
            return {}
        try:
            return await asyncio.wait_for(self._sync(), self.timeout_s)
        except Exception as e:
            self.failures += 1
            log.warning("weight sync failed (keeping version %s): %s: %s", self.engine.version, type(e).__name__, e)
            return {}

    async def _sync(self) -> dict[str, float]:
        newer, self._known = self._known, None
        if newer is None or newer[0] <= self.engine.version:  # else: wait_for just saw it; no second call
            newer = await self.store.newer_than.remote(self.engine.version)
        if newer is None:
            return {}
        start = time.time()
        parts = await fetch_parts(newer[1])
        with PeakResident() as mem:
            self.engine.load_weight_parts(released(parts))
        end = time.time()
        self._count(parts, start, end, mem)
        return {"weights_start": start, "weights_end": end}

    def _count(self, parts: list, start: float, end: float, mem: PeakResident) -> None:
        nbytes = sum(p.nbytes for p in parts)
        self.sync_s += end - start
        self.loads += 1
        self.sync_bytes += nbytes
        self.last_interval = {"weights_start": start, "weights_end": end}
        self.last_memory = {"resident_before": mem.start, "resident_peak": mem.peak, "ratio": mem.ratio}
        self.max_reload_ratio = max(self.max_reload_ratio, mem.ratio)
        log.info("weights v%d: %d bytes in %d parts copied into the rollout engine in %.3f s (resident "
                 "%.2f GB, peak %.2f GB during the load)", parts[0].version, nbytes, len(parts), end - start,
                 mem.start / 1e9, mem.peak / 1e9)

    def last_load_within(self, since: float) -> dict[str, float]:
        """The latest load's interval if it ended after ``since`` (it happened under a request)."""
        return dict(self.last_interval) if self.last_interval.get("weights_end", 0.0) >= since else {}

    async def follow(self, on_loaded: Optional[Any] = None, poll_s: float = 30.0) -> None:
        """Streaming engines: load every published version as soon as it is published, while
        requests are in flight (``engine.aload_weights`` pauses generation between engine steps),
        then call ``on_loaded(version)``. Runs until cancelled; a failed load is counted and logged,
        and the replica keeps its weights (each token records its version; the queue enforces
        staleness)."""
        if self.store is None:
            return
        while True:
            try:
                newer = await self.store.wait_newer.remote(self.engine.version, poll_s)
                if newer is None or newer[0] <= self.engine.version:
                    continue
                await asyncio.wait_for(self._load_in_flight(newer), self.timeout_s)
                if on_loaded is not None:
                    on_loaded(self.engine.version)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                log.warning("in-flight weight load failed (keeping version %s): %s: %s", self.engine.version,
                            type(e).__name__, e)
                await asyncio.sleep(min(1.0, poll_s))

    async def _load_in_flight(self, newer: tuple[int, list[Any]]) -> None:
        parts = await fetch_parts(newer[1])
        start = time.time()
        with PeakResident() as mem:
            await self.engine.aload_weight_parts(released(parts))
        self._count(parts, start, time.time(), mem)