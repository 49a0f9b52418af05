"""Versioned weight publication from the actor to rollout (and teacher) replicas.

The actor puts each ``WeightPayload`` (full state, or the LoRA adapter only) into the Ray object
store once and publishes the object reference with its version here; replicas ask for anything
newer than what they hold between requests and fetch it zero-copy. Only the newest version is
kept, so old payloads are freed as soon as no replica holds them.

``WeightStore`` is a plain class; the driver runs it as a named Ray actor. A rollout request sent
ahead of the weights it needs (``rollout.admit_ahead_steps``) waits in ``wait_newer``, so it starts
generating as soon as the trainer publishes, without a round trip through the driver.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Published:
    version: int
    kind: str
    nbytes: int


class WeightStore:
    def __init__(self) -> None:
        self._latest: Optional[Published] = None
        self._ref: Optional[list[Any]] = None  # [ObjectRef]: wrapped so Ray does not resolve it
        self.publications = 0
        self._published: Optional[asyncio.Event] = None  # set on the next publication (as an actor only)

    def publish(self, version: int, ref: list[Any], kind: str, nbytes: int) -> None:
        if self._latest is not None and version <= self._latest.version:
            raise ValueError(f"weight version {version} is not newer than {self._latest.version}")
        self._latest = Published(version, kind, nbytes)
        self._ref = ref
        self.publications += 1
        if self._published is not None:  # an async actor runs every method on its event loop
            self._published.set()
            self._published = None

    def rollback(self) -> None:
        """Forget the newest publication: the trainer was restored from an earlier checkpoint in
        the same run (``driver.run``) and publishes that older version next."""
        self._latest, self._ref = None, None

    async def wait_newer(self, version: int, timeout_s: float) -> Optional[tuple[int, list[Any]]]:
        """``newer_than(version)``, waiting up to ``timeout_s`` for a publication if there is none yet."""
        newer = self.newer_than(version)
        if newer is None:
            if self._published is None:
                self._published = asyncio.Event()
            try:
                await asyncio.wait_for(self._published.wait(), timeout_s)
            except asyncio.TimeoutError:
                return None
            newer = self.newer_than(version)
        return newer

    def newer_than(self, version: int) -> Optional[tuple[int, list[Any]]]:
        """(version, [ref]) of the newest publication if it is newer than ``version``."""
        if self._latest is None or self._latest.version <= version:
            return None
        return self._latest.version, self._ref

    def info(self) -> Optional[Published]:
        return self._latest


def store_name(run_id: str) -> str:
    return f"relaxrl-weights-{run_id}"


class WeightSyncError(RuntimeError):
    """Weights could not be published: the run stops with this error rather than hang."""


async def publish_with_timeout(store: Any, version: int, ref: list[Any], kind: str, nbytes: int,
                               timeout_s: float) -> None:
    """``store.publish`` (an actor call) that fails within ``timeout_s`` instead of blocking the trainer."""
    try:
        await asyncio.wait_for(_call(store.publish.remote(version, ref, kind, nbytes)), timeout_s)
    except asyncio.TimeoutError:
        raise WeightSyncError(f"publishing weight version {version} timed out after {timeout_s}s") from None
    except Exception as e:
        raise WeightSyncError(f"publishing weight version {version} failed: {type(e).__name__}: {e}") from e


async def _call(ref: Any) -> Any:
    return await ref
