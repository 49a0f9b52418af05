"""How a training batch is cut into micro-batches, and into PPO mini-batches.

Rows of very uneven length padded to the batch's widest pay for padding in every matmul. With a
token budget (``trainer.max_tokens_per_micro_batch``) rows are bucketed by length: sorted longest
first and taken greedily while ``rows x widest <= budget``, and each micro-batch is cut to its own
widest row. Losses are normalised over the whole batch (``prepare``), so they are additive over any
row subsets, and the step's loss and gradient do not depend on how its rows are grouped.

Data parallelism (``rank_micro_batches``): every rank holds the whole batch and trains its share of
the rows; the shares' losses add up to the batch's, and every rank runs the same number of
micro-batches (fillers where a rank is short), since ZeRO-3's gathers and the gradient reduction
are collectives that every rank must enter equally often.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from relaxrl.sample import TensorBatch


def plan_micro_batches(lengths: Sequence[int], max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch. ``max_tokens <= 0``: consecutive runs of ``max_rows`` rows
    (in order). Else buckets by length, at most ``max_rows`` rows and ``max_tokens`` padded token
    slots each; a row longer than the budget gets a micro-batch of its own."""
    if max_rows < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {max_rows}")
    n = len(lengths)
    if max_tokens <= 0:
        return [list(range(i, min(i + max_rows, n))) for i in range(0, n, max_rows)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    plans: list[list[int]] = []
    for i in order:
        # Sorted longest first, so a micro-batch's first row is its widest.
        if plans and len(plans[-1]) < max_rows and (len(plans[-1]) + 1) * lengths[plans[-1][0]] <= max_tokens:
            plans[-1].append(i)
        else:
            plans.append([i])
    return plans


def rank_micro_batches(lengths: Sequence[int], world_size: int, rank: int, micro_batch_size: int,
                       max_tokens: int = 0) -> list[list[int]]:
    """This rank's micro-batches (row indices of the whole batch) under data parallelism.

    Rows are dealt longest first, each to the rank with the fewest tokens so far among those with
    room (row counts differ by at most one, so no rank is empty while there are rows for it), then
    planned per rank as ``plan_micro_batches`` does. Every rank gets the same number of
    micro-batches: a rank with fewer gets empty lists at the end, fillers the engine runs at zero
    weight (or skips where no collective runs inside a pass). Deterministic, so the ranks agree
    without exchanging anything. One rank: the plain plan."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} ranks")
    if world_size == 1:
        return plan_micro_batches(lengths, micro_batch_size, max_tokens)
    base, extra = divmod(len(lengths), world_size)  # `extra` ranks get one row more than `base`
    shares: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        bigger = sum(len(s) > base for s in shares)
        room = [r for r in range(world_size) if len(shares[r]) < base or (len(shares[r]) == base and bigger < extra)]
        r = min(room, key=lambda r: (tokens[r], r))
        shares[r].append(i)
        tokens[r] += lengths[i]
    plans = [[[mine[j] for j in p] for p in plan_micro_batches([lengths[i] for i in mine], micro_batch_size,
                                                                max_tokens)] for mine in shares]
    count = max(len(p) for p in plans)
    return plans[rank] + [[] for _ in range(count - len(plans[rank]))]


def row_lengths(batch: TensorBatch) -> list[int]:
    """Real tokens of each row (prompt + response) of a right-padded batch."""
    return batch.attention_mask.sum(-1).tolist()


def take_rows(batch: TensorBatch, rows: Sequence[int], width: Optional[int] = None) -> TensorBatch:
    """Rows ``rows`` of ``batch``, cut to ``width`` token columns (default: their widest row), with
    per-row extras taken along; batch-wide scalars are kept as they are."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    if width is None:
        width = int(batch.attention_mask[index].sum(-1).max())

    def cut(t: Optional[torch.Tensor], cols: int) -> Optional[torch.Tensor]:
        return None if t is None else t[index, :cols] if t.dim() > 1 else t[index]

    per_token = {"loss_mask", "behaviour_logprobs", "ref_logprobs", "teacher_logprobs"}
    changes = {f.name: cut(getattr(batch, f.name), width - 1 if f.name in per_token else width)
               for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
    # Extras are per-row; per-token ones ([B, T-1]) are cut to the micro-batch's columns too.
    changes["extras"] = {k: cut(v, width - 1) for k, v in batch.extras.items()}
    changes["scalars"] = dict(batch.scalars)
    return dataclasses.replace(batch, **changes)


def pad_fraction(batch: TensorBatch, plans: Sequence[Sequence[int]]) -> float:
    """Padded share of the token slots the micro-batches of ``plans`` compute on."""
    return padded_share(row_lengths(batch), plans)


def padded_share(lengths: Sequence[int], plans: Sequence[Sequence[int]]) -> float:
    """``pad_fraction`` on row lengths: each micro-batch (row indices) padded to its widest row."""
    slots = sum(len(p) * max(lengths[i] for i in p) for p in plans if p)
    return 1.0 - sum(lengths[i] for p in plans for i in p) / max(slots, 1)


def split_groups(group_index: torch.Tensor, parts: int) -> list[list[int]]:
    """Row indices of ``parts`` mini-batches of whole groups (a group's advantages are taken over
    the group): group ``j`` of ``n`` (in order of first appearance) goes to mini-batch
    ``j * parts // n``, so mini-batches differ by at most one group."""
    if parts < 1:
        raise ValueError(f"mini_batches must be >= 1, got {parts}")
    groups: dict[int, list[int]] = {}
    for row, g in enumerate(group_index.tolist()):
        groups.setdefault(g, []).append(row)
    if parts > len(groups):
        raise ValueError(f"trainer.mini_batches={parts} exceeds the batch's {len(groups)} groups: a mini-batch "
                         "holds whole groups")
    out: list[list[int]] = [[] for _ in range(parts)]
    for j, rows in enumerate(groups.values()):
        out[j * parts // len(groups)].extend(rows)
    return out
