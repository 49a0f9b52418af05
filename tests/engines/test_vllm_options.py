"""vLLM engine options are checked before any vLLM import (both the offline and the streaming engine)."""

import pytest

from relaxrl.engines.vllm_generation import checked_options


def test_bad_dtype_and_parallel_size_are_named():
    assert checked_options("auto", {"tensor_parallel_size": 2}).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        checked_options("fp8", None)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        checked_options("bfloat16", {"tensor_parallel_size": 0})
