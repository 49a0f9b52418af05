"""Algorithm contract: declared sample fields, a batch preparation step and a loss.

Algorithms are pure tensor code: no Ray, no services, no engines.
"""

from __future__ import annotations

from typing import Protocol

import torch

from relaxrl.sample import TensorBatch


class Algorithm(Protocol):
    name: str
    # Sample fields (see relaxrl.sample.KNOWN_FIELDS) that must be filled in before training.
    required_fields: tuple[str, ...]

    def prepare(self, batch: TensorBatch) -> TensorBatch:
        """Fill ``batch.extras`` (per-row targets, e.g. advantages) and ``batch.scalars``
        (batch-wide normalisers) from the *whole* batch, before micro-batching."""

    def loss(self, logprobs: torch.Tensor, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of a (micro-)batch given current per-token log-probs ``[b, T-1]``.

        Normalised with ``batch.scalars`` so that summing over micro-batches gives the
        whole-batch loss. Metrics are per-micro-batch means.
        """
