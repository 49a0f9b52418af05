"""Engine contract suite: the same cases on every generation engine (HF, vLLM) and every trainer
engine (torch, DeepSpeed). Engines whose package is not installed are skipped with a reason, so the
default suite runs the HF/torch cases and ``.ci/run``'s engines venv runs them all."""

from __future__ import annotations

import pytest

from relaxrl.models.chat import render_prompt_ids
from relaxrl.models.tiny import build_tiny_model, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def base_model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="session")
def other_model(tokenizer):
    """Different weights of the same shape: the "new version" of a weight update."""
    return build_tiny_model(tokenizer, seed=1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, base_model, tokenizer):
    path = tmp_path_factory.mktemp("contract-model")
    base_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """16 chat prompts of different lengths."""
    return [render_prompt_ids(tokenizer, f"q{i}:" + "ab" * (i % 5)) for i in range(16)]
