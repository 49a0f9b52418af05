"""Engine contracts. Engines hold the model and do the compute; they never import Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol, Sequence

import torch

from relaxrl.sample import TensorBatch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    seed: Optional[int] = None  # per-request seed: the same seed and weights give the same tokens


def request_seeds(seed: Optional[int], n: int) -> list[Optional[int]]:
    """One seed per request of a call (both streaming engines, vLLM's batch engine): the same call
    seed gives the same tokens, and the copies of a prompt in a group still get different samples
    (one shared seed would make them identical)."""
    if seed is None:
        return [None] * n
    return [(int(seed) * 1_000_003 + i) % (2**63 - 1) for i in range(n)]


@dataclass
class Generation:
    """One sampled response."""

    response_ids: list[int]  # includes the EOS token when the response stopped on it
    # log_softmax(logits / temperature) at each sampled token (top-p truncation not reflected; greedy
    # uses temperature 1). The trainer computes the same quantity with the same temperature.
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"
    # Per response token, the weight version that sampled it; empty: all by the engine's version at
    # the end of the call (a batch-synchronous engine never changes weights inside a call).
    token_versions: list[int] = field(default_factory=list)


@dataclass
class WeightPayload:
    """A versioned weight update: the full state dict, or only a LoRA adapter's tensors, as CPU
    tensors the payload owns (``relaxrl.engines.payload.pack_weights`` copies them out of the
    model once, cast to the rollout's dtype; a tied weight is stored once).

    A large update travels as *parts* (``split_payload``): each holds some of the tensors and the
    whole update's ``manifest`` (name -> shape, dtype), so a receiver checks every name and shape
    before it copies anything and loads part by part, holding one part at a time. Through Ray the
    tensors are numpy buffers (``__reduce__``): ``ray.put`` copies them into the object store once
    and ``ray.get`` maps them without a copy."""

    version: int
    kind: str  # "full" or "lora"
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # empty: ``tensors``' own

    def __post_init__(self) -> None:
        if not self.manifest:
            self.manifest = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __reduce__(self):
        from relaxrl.engines.payload import payload_from_arrays, payload_to_arrays

        return payload_from_arrays, payload_to_arrays(self)


class GenerationEngine(Protocol):
    version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """Sample one response per prompt (repeat a prompt n times for a group)."""

    def load_weights(self, payload: WeightPayload) -> None:
        """Replace the policy weights with ``payload`` and adopt its version."""

    def load_weight_parts(self, parts: "Iterable[WeightPayload]") -> None:
        """``load_weights`` for an update split into parts (``split_payload``): every name and shape
        of the first part's manifest is checked first, then each part is copied in place as it comes."""


class StreamingGenerationEngine(GenerationEngine, Protocol):
    """A generation engine whose requests run on their own (continuous batching): each joins the
    running batch when it arrives and returns when its own response ends, and ``load_weights`` may
    run while requests are in flight (between engine steps; the tokens after it are sampled, and
    their log-probs computed, by the new weights; ``Generation.token_versions`` says which)."""

    async def agenerate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """Like ``generate``, awaitable from any event loop; concurrent calls share the engine's batch."""


# loss_fn(token_logprobs [b, T-1], micro_batch) -> (loss already normalised for the whole batch, metrics)
LossFn = Callable[[torch.Tensor, TensorBatch], "tuple[torch.Tensor, dict[str, float]]"]
# prepare(batch) -> batch with the algorithm's targets and normalisers (``Algorithm.prepare``)
PrepareFn = Callable[[TensorBatch], TensorBatch]


class TrainerEngine(Protocol):
    version: int

    def train_step(self, batch: TensorBatch, loss_fn: LossFn, *, prepare: Optional[PrepareFn] = None,
                   proximal: bool = False) -> dict[str, float]:
        """One step over ``batch`` (micro-batched, gradients accumulated; with PPO mini-batches one
        update per mini-batch, each prepared by ``prepare``); bumps version by one. ``proximal``: put
        the step-start policy's log-probs in ``extras["prox_logprobs"]`` when there are several updates."""

    def logprobs(self, batch: TensorBatch) -> torch.Tensor:
        """Per-target-token log-probs ``[B, T-1]`` under the current weights, no grad."""

    def export_weights(self) -> WeightPayload:
        """The weights to publish: full state, or the adapter only when LoRA is on."""

    def save_checkpoint(self, path: str) -> None: ...

    def load_checkpoint(self, path: str) -> None: ...
