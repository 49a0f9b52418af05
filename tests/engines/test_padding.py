"""Padding helpers of the engines, against hand-written tensors."""

import torch

from relaxrl.engines.logprobs import left_pad, right_pad


def test_left_pad_puts_tokens_at_the_right_edge():
    ids, mask = left_pad([[5, 6], [7], [8, 9, 4]], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7], [8, 9, 4]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_right_pad_puts_tokens_at_the_left_edge():
    ids, mask = right_pad([[5, 6], [7], [8, 9, 4]], pad_id=3)
    assert ids.tolist() == [[5, 6, 3], [7, 3, 3], [8, 9, 4]]
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]


def test_an_empty_row_is_all_padding():
    ids, mask = left_pad([[], [1, 2]], pad_id=9)
    assert ids.tolist() == [[9, 9], [1, 2]] and mask.tolist() == [[0, 0], [1, 1]]
