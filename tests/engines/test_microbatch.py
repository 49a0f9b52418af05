"""Micro-batch planning: token budgets, cutting rows, mini-batches of whole groups."""

import pytest
import torch

from relaxrl.engines.microbatch import pad_fraction, plan_micro_batches, split_groups, take_rows
from relaxrl.sample import Sample, collate


def test_plan_without_budget_is_consecutive_rows():
    assert plan_micro_batches([5, 1, 9, 2, 3], max_rows=2) == [[0, 1], [2, 3], [4]]


def test_plan_with_budget_buckets_by_length():
    # longest first: 9 alone (9 + 9 > 12), then 5 + 3 (2 x 5 = 10 <= 12), then 2 + 1 (2 x 2)
    assert plan_micro_batches([5, 1, 9, 2, 3], max_rows=8, max_tokens=12) == [[2], [0, 4], [3, 1]]
    assert plan_micro_batches([5, 1, 9, 2, 3], max_rows=1, max_tokens=100) == [[2], [0], [4], [3], [1]]
    assert plan_micro_batches([50, 2], max_rows=4, max_tokens=10) == [[0], [1]]  # over budget: alone
    with pytest.raises(ValueError, match="micro_batch_size"):
        plan_micro_batches([1], max_rows=0)


def _batch(lengths, prompt=2):
    samples = [Sample(uid=f"g{i // 2}/{i % 2}", group_id=f"g{i // 2}", index=i % 2, prompt_ids=[3] * prompt,
                      response_ids=list(range(4, 4 + n)), behaviour_logprobs=[-1.0 - i] * n, reward=float(i))
               for i, n in enumerate(lengths)]
    return collate(samples, pad_id=0)


def test_take_rows_cuts_to_the_widest_selected_row():
    b = _batch([1, 7, 3, 2])
    b.extras["advantages"] = torch.arange(4.0)[:, None] * b.loss_mask
    mb = take_rows(b, [2, 0])
    assert mb.input_ids.shape == (2, 5) and mb.loss_mask.shape == (2, 4) and mb.extras["advantages"].shape == (2, 4)
    assert torch.equal(mb.input_ids, b.input_ids[[2, 0], :5])
    assert torch.equal(mb.behaviour_logprobs, b.behaviour_logprobs[[2, 0], :4])
    assert mb.rewards.tolist() == [2.0, 0.0] and mb.group_index.tolist() == [1, 0]
    assert torch.equal(mb.extras["advantages"], b.extras["advantages"][[2, 0], :4])


def test_pad_fraction_falls_with_bucketing():
    b = _batch([1, 30, 2, 28, 3, 29])
    lengths = b.attention_mask.sum(-1).tolist()
    flat = plan_micro_batches(lengths, max_rows=2)
    bucketed = plan_micro_batches(lengths, max_rows=2, max_tokens=64)
    assert pad_fraction(b, flat) > 2 * pad_fraction(b, bucketed)
    assert pad_fraction(b, [[1]]) == 0.0


def test_split_groups_keeps_groups_whole():
    gi = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert split_groups(gi, 2) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert split_groups(gi, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert split_groups(gi, 1) == [list(range(10))]
    with pytest.raises(ValueError, match="exceeds the batch's 5 groups"):
        split_groups(gi, 6)
