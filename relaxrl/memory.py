"""Resident memory of this process: what a weight reload costs, and giving back mapped pages.

``PeakResident`` samples ``/proc/self/statm`` on a thread (tracemalloc does not see torch
tensors). ``drop_shared_pages`` exists because a tensor read zero-copy from Ray's object store is
a view of a shared memory mapping: every page a load touches stays in this process's resident set
after the object is released (the mapping is the store's, and stays). ``madvise(MADV_DONTNEED)``
on a *shared* mapping only unmaps the pages here (the data stays in the store, and is faulted in
again if read), so a rollout replica that loads an update part by part holds one part's pages at a
time. Private memory is never touched: that would zero it.

Linux only; elsewhere the functions measure nothing and drop nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Iterable, Optional

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_DONTNEED = 4


def resident_bytes() -> int:
    """This process's resident set size (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


class PeakResident:
    """The highest resident size seen while the ``with`` block runs, sampled every ``every_s``;
    ``start``: the size when it began."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s, self.start, self.peak = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-resident")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakResident":
        self.start = self.peak = resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def ratio(self) -> float:
        return self.peak / self.start if self.start else float("nan")


def shared_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's shared mappings (``/proc/self/maps`` with an ``s`` flag)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split()[:2]
                if "s" in perms:
                    lo, hi = span.split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def drop_shared_pages(tensors: Iterable[torch.Tensor], mappings: Optional[list[tuple[int, int]]] = None) -> int:
    """Unmap from this process the whole pages of each CPU tensor that lies in a shared mapping
    (see the module docstring); returns the bytes advised. Anything else is left alone."""
    if mappings is None:
        mappings = shared_mappings()
    if not mappings:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    done = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        addr = t.data_ptr()
        lo = (addr + PAGE - 1) // PAGE * PAGE
        hi = (addr + t.numel() * t.element_size()) // PAGE * PAGE
        if hi <= lo or not any(s <= lo and hi <= e for s, e in mappings):
            continue
        if madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
            done += hi - lo
    return done
