"""The driver's train loop stops at once, with the cause, when a produce loop dies outside its role
calls (those are retried or dropped and counted), instead of waiting out the batch timeout."""

import asyncio

import pytest

from relaxrl.driver import ProducerFailed, _train_watching


async def _forever():
    await asyncio.Event().wait()


async def _fails_after(delay, error):
    await asyncio.sleep(delay)
    raise error


async def _value_after(delay, value):
    await asyncio.sleep(delay)
    return value


def test_a_dying_producer_stops_the_train_loop_with_its_error():
    async def main():
        train = asyncio.ensure_future(_forever())
        producers = [asyncio.ensure_future(_forever()),
                     asyncio.ensure_future(_fails_after(0.01, KeyError("task 7 has no prompt")))]
        with pytest.raises(ProducerFailed, match="KeyError: 'task 7 has no prompt'") as info:
            await asyncio.wait_for(_train_watching(train, producers), 5)
        assert isinstance(info.value.__cause__, KeyError)
        assert train.cancelled()  # the train loop is stopped, not left waiting for a batch
        producers[0].cancel()

    asyncio.run(main())


def test_the_train_loop_result_and_error_pass_through():
    async def main():
        producers = [asyncio.ensure_future(_value_after(0.0, None))]  # producers that end cleanly
        await asyncio.wait_for(_train_watching(_value_after(0.02, "done"), producers), 5)
        with pytest.raises(RuntimeError, match="trainer lost"):
            await _train_watching(_fails_after(0.01, RuntimeError("trainer lost")), [asyncio.ensure_future(_forever())])

    asyncio.run(main())
