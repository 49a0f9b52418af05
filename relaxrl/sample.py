"""The one record every role fills in, and its padded tensor form for the trainer.

A ``Sample`` starts at the rollout (prompt, response, behaviour log-probs, version), gains a reward
at the reward role, optionally teacher/reference log-probs at the teacher role, and is trained on
once. ``TensorBatch`` is the padded form the trainer engine and the algorithms work on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # torch is imported where tensors are built: the reward role and the queue, which
    import torch  # only pass samples on, start ~3 s of CPU sooner without it

# Fields an algorithm may declare as required; each maps to a check of "is it filled in".
_FIELD_CHECKS = {
    "response_ids": lambda s: len(s.response_ids) > 0,
    "behaviour_logprobs": lambda s: len(s.behaviour_logprobs) == len(s.response_ids) > 0,
    "reward": lambda s: s.reward is not None,
    "ref_logprobs": lambda s: s.ref_logprobs is not None and len(s.ref_logprobs) == len(s.response_ids),
    "teacher_logprobs": lambda s: s.teacher_logprobs is not None
    and len(s.teacher_logprobs) == len(s.response_ids),
}
KNOWN_FIELDS = tuple(_FIELD_CHECKS)


@dataclass
class Sample:
    """One response to one prompt, with everything the roles learned about it."""

    uid: str  # unique per sample: "<group_id>/<index>"
    group_id: str  # all samples answering the same prompt share it (a GRPO group)
    index: int  # position within the group
    prompt_ids: list[int]
    domain: str = "default"
    env: str = ""
    answer: Optional[str] = None  # ground truth for the verifier; never shown to the policy
    response_ids: list[int] = field(default_factory=list)
    # 1 for tokens the policy produced (trained on), 0 for env/tool tokens inside the response.
    loss_mask: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    policy_version: int = -1  # weight version of the rollout policy that produced the response
    finish_reason: str = ""  # "stop" (EOS) or "length"
    response_text: str = ""
    reward: Optional[float] = None
    reward_info: dict[str, Any] = field(default_factory=dict)
    ref_logprobs: Optional[list[float]] = None
    teacher_logprobs: Optional[list[float]] = None
    teacher_topk_ids: Optional[list[list[int]]] = None
    teacher_topk_logprobs: Optional[list[list[float]]] = None
    # gen_start/gen_end (wall clock), ...: one dict shared by the samples of a generate call, so a
    # batch pickles it once. Never changed in place: a role adding timings assigns a new dict.
    timings: dict[str, float] = field(default_factory=dict)

    def missing(self, fields: Sequence[str]) -> list[str]:
        """Names of the required ``fields`` not yet filled in."""
        unknown = [f for f in fields if f not in _FIELD_CHECKS]
        if unknown:
            raise ValueError(f"unknown sample field(s) {unknown}; known: {list(KNOWN_FIELDS)}")
        return [f for f in fields if not _FIELD_CHECKS[f](self)]

    def replace(self, **changes: Any) -> "Sample":
        return dataclasses.replace(self, **changes)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Sample))


class Packed:
    """A list of samples as it travels between roles: pickled column by column, and unpickled as
    the plain ``list[Sample]`` again, so a receiver never sees this class.

    With the shared timings and prompts (``samples_from_generations``), a 256-sample request
    pickles and unpickles in 0.62-0.63 of the time the per-sample copies took, at 0.61 of the size
    (``bench/wire_format.py``); it makes three such hops (rollout → reward → queue → trainer)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples

    def __reduce__(self) -> tuple:
        rows = [s.__dict__ for s in self.samples]
        return _unpack, (_FIELD_NAMES, [[r[f] for r in rows] for f in _FIELD_NAMES])


def _unpack(names: Sequence[str], columns: Sequence[list]) -> list[Sample]:
    """The samples ``Packed`` pickled (no ``__init__`` call: the values were checked when built)."""
    if tuple(names) != _FIELD_NAMES:  # a sender running other code than this process
        return [Sample(**dict(zip(names, row))) for row in zip(*columns)]
    out = []
    for row in zip(*columns):
        s = object.__new__(Sample)
        s.__dict__.update(zip(names, row))
        out.append(s)
    return out


@dataclass
class TensorBatch:
    """Right-padded tensors for a list of samples.

    Per-token tensors have shape ``[B, T-1]`` and are aligned with *targets*: column ``t`` refers
    to token ``input_ids[:, t+1]`` predicted from the prefix ending at ``t``. ``loss_mask`` is 1
    exactly on the policy's own response tokens.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T-1] float
    behaviour_logprobs: torch.Tensor  # [B, T-1] float, 0 off the mask
    rewards: torch.Tensor  # [B] float
    group_index: torch.Tensor  # [B] long, 0..num_groups-1
    policy_versions: torch.Tensor  # [B] long
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T-1]
    teacher_logprobs: Optional[torch.Tensor] = None  # [B, T-1]
    # Filled by an algorithm's ``prepare``: per-row tensors (first dim B) and batch-wide scalars.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, start: int, stop: int) -> "TensorBatch":
        """A micro-batch view of rows ``[start, stop)``; batch-wide scalars are kept as they are."""

        def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[start:stop]

        return TensorBatch(
            input_ids=self.input_ids[start:stop],
            attention_mask=self.attention_mask[start:stop],
            loss_mask=self.loss_mask[start:stop],
            behaviour_logprobs=self.behaviour_logprobs[start:stop],
            rewards=self.rewards[start:stop],
            group_index=self.group_index[start:stop],
            policy_versions=self.policy_versions[start:stop],
            ref_logprobs=cut(self.ref_logprobs),
            teacher_logprobs=cut(self.teacher_logprobs),
            extras={k: v[start:stop] for k, v in self.extras.items()},
            scalars=dict(self.scalars),
        )


def _padded(rows: Sequence[Sequence[float]], starts: Sequence[int], width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[len(rows), width]`` tensor with ``rows[i]`` placed at column ``starts[i]``, zeros elsewhere.
    Built as Python lists and converted once: a tensor per row costs more than the data itself."""
    import torch

    return torch.tensor([[0] * st + list(r) + [0] * (width - st - len(r)) for r, st in zip(rows, starts)], dtype=dtype)


def collate(samples: Sequence[Sample], pad_id: Optional[int]) -> TensorBatch:
    """Pad ``samples`` (prompt + response, right-padded) into a ``TensorBatch``.

    ``pad_id`` None (a tokenizer with no pad token, as Llama-3's and Mistral's) pads with 0: the
    attention and loss masks exclude every padding position, so its value never matters."""
    import torch

    pad_id = 0 if pad_id is None else int(pad_id)

    if not samples:
        raise ValueError("collate() needs at least one sample")
    for s in samples:
        if not s.prompt_ids:
            raise ValueError(f"sample {s.uid} has an empty prompt")
        if s.loss_mask and len(s.loss_mask) != len(s.response_ids):
            raise ValueError(
                f"sample {s.uid}: loss_mask has {len(s.loss_mask)} entries for "
                f"{len(s.response_ids)} response tokens"
            )
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    seqs = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    input_ids = torch.tensor([q + [pad_id] * (width - len(q)) for q in seqs], dtype=torch.long)
    attention = _padded([[1] * len(q) for q in seqs], [0] * len(seqs), width, torch.long)
    # Per-token values sit at their target columns: response token j of a prompt of length p is
    # predicted at column p - 1 + j.
    starts = [len(s.prompt_ids) - 1 for s in samples]
    masks = [s.loss_mask if s.loss_mask else [1] * len(s.response_ids) for s in samples]
    loss_mask = _padded(masks, starts, width - 1, torch.float32)
    behaviour = _padded([s.behaviour_logprobs for s in samples], starts, width - 1, torch.float32)
    has_ref = all(s.ref_logprobs is not None for s in samples)
    has_teacher = all(s.teacher_logprobs is not None for s in samples)
    ref = _padded([s.ref_logprobs for s in samples], starts, width - 1, torch.float32) if has_ref else None
    teacher = _padded([s.teacher_logprobs for s in samples], starts, width - 1, torch.float32) if has_teacher else None
    group_of: dict[str, int] = {}
    for s in samples:
        group_of.setdefault(s.group_id, len(group_of))
    return TensorBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        behaviour_logprobs=behaviour,
        rewards=torch.tensor([0.0 if s.reward is None else float(s.reward) for s in samples]),
        group_index=torch.tensor([group_of[s.group_id] for s in samples], dtype=torch.long),
        policy_versions=torch.tensor([s.policy_version for s in samples], dtype=torch.long),
        ref_logprobs=ref,
        teacher_logprobs=teacher,
    )
