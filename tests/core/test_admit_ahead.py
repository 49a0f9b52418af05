"""Requests sent ahead of their weights: the store's wait for a publication, and the driver's
timeout that starts only once those weights exist (and calls a request off when the run ends)."""

import asyncio

import pytest

from relaxrl.driver import VersionClock, _timed_from
from relaxrl.weights import WeightStore


def test_store_wait_newer_returns_at_the_publication(ray_local):
    ray = ray_local
    store = ray.remote(WeightStore).remote()

    async def main():
        assert await store.wait_newer.remote(0, 0.2) is None  # nothing published: times out empty
        waiting = asyncio.ensure_future(store.wait_newer.remote(0, 30.0))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await store.publish.remote(1, [ray.put(b"w1")], "full", 2)
        version, (ref,) = await asyncio.wait_for(waiting, 10.0)
        assert version == 1 and await ref == b"w1"
        assert (await store.wait_newer.remote(0, 0.0))[0] == 1  # already there: no wait

    asyncio.run(main())
    ray.kill(store)


def test_timeout_counts_from_when_the_version_is_reached():
    async def main():
        clock = VersionClock(0)
        # Waits 0.3 s for version 1, then takes 0.1 s: within a 0.2 s timeout counted from version 1.
        chain_done = asyncio.Event()

        async def chain():
            await asyncio.sleep(0.4)
            chain_done.set()

        run = asyncio.ensure_future(_timed_from(chain(), 0.2, clock, need=1))
        await asyncio.sleep(0.3)
        await clock.set(1)
        await run
        assert chain_done.is_set()
        # Already at the version: the timeout applies from the start.
        with pytest.raises(asyncio.TimeoutError):
            await _timed_from(asyncio.sleep(1.0), 0.1, clock, need=1)

    asyncio.run(main())


def test_a_request_waiting_for_weights_is_called_off_when_the_run_ends():
    async def main():
        clock = VersionClock(3)
        cancelled = asyncio.Event()

        async def chain():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        run = asyncio.ensure_future(_timed_from(chain(), 60.0, clock, need=4))
        await asyncio.sleep(0.05)
        await clock.close()
        await asyncio.wait_for(run, 5.0)  # returns quietly: the groups stay in flight, counted
        assert cancelled.is_set() and not await clock.reached(4)

    asyncio.run(main())
