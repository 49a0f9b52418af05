"""An in-process student policy for concurrent episodes: pending actions are generated in batches.

Episodes are asyncio tasks; each awaits its action. Requests that arrive while a batch is being
generated are merged into the next one, so N concurrent episodes cost about one ``generate`` call
per turn instead of N. (Under Serve the rollout deployment's ``serve.batch`` does the same.)
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from relaxrl.engines.base import Generation, SamplingParams


class BatchedPolicy:
    def __init__(self, engine: Any, params: SamplingParams, max_batch: int = 256) -> None:
        self.engine, self.params, self.max_batch = engine, params, max_batch
        self._pending: list[tuple[list[int], int, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.calls = 0  # generate() calls made, for tests of the batching

    async def __call__(self, state_ids: list[int], max_new_tokens: int) -> tuple[Generation, int]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(state_ids), int(max_new_tokens), fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._pending:
            for _ in range(3):  # let every runnable episode reach its next action first
                await asyncio.sleep(0)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            # A fresh seed per call: a fixed one would replay the same random stream every turn.
            seed = None if self.params.seed is None else self.params.seed * 1_000_003 + self.calls
            params = dataclasses.replace(self.params, max_new_tokens=max(n for _, n, _ in batch), seed=seed)
            try:
                gens = self.engine.generate([p for p, _, _ in batch], params)
                self.calls += 1
            except Exception as e:  # every waiting episode sees the failure, none hangs
                for _, _, fut in batch:
                    fut.set_exception(e)
                continue
            for (_, n, fut), g in zip(batch, gens):
                fut.set_result((_truncate(g, n), self.engine.version))


def _truncate(g: Generation, n: int) -> Generation:
    """A generation cut to ``n`` tokens (a batch generates up to its longest request's budget)."""
    if len(g.response_ids) <= n:
        return g
    return Generation(g.response_ids[:n], g.logprobs[:n], "length")
