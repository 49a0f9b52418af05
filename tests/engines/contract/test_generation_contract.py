"""Generation engines (HF, vLLM): the same sampled tokens get the same log-probs as the HF model,
in place weight updates and LoRA adapters change them exactly as the HF model's would."""

from __future__ import annotations

import pytest

from relaxrl.engines.base import SamplingParams, WeightPayload
from relaxrl.engines.payload import pack_weights
from relaxrl.models.lora import adapter_state_dict

from .helpers import (
    GENERATION_KINDS,
    LORA,
    STREAMING_KINDS,
    TOL,
    close,
    lora_model_with_adapter,
    make_generation_engine,
    max_diff,
    merged,
    reference_logprobs,
)


@pytest.fixture(scope="module", params=GENERATION_KINDS + STREAMING_KINDS)
def engine(request, model_dir):
    e = make_generation_engine(request.param, model_dir)
    yield e
    close(e)


@pytest.fixture(scope="module", params=GENERATION_KINDS)
def lora_engine(request, model_dir):
    e = make_generation_engine(request.param, model_dir, lora=LORA)
    yield e
    close(e)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0], ids=["t1", "t0.7", "greedy"])
def test_same_weights_same_logprobs(engine, base_model, tokenizer, prompts, temperature):
    params = SamplingParams(temperature=temperature, max_new_tokens=6, seed=3)
    gens = engine.generate(prompts, params)
    assert len(gens) == len(prompts)
    eos = tokenizer.eos_token_id
    for g in gens:
        assert len(g.logprobs) == len(g.response_ids) > 0 and all(lp <= 0 for lp in g.logprobs)
        if g.finish_reason == "stop":
            assert g.response_ids[-1] == eos and eos not in g.response_ids[:-1]
        else:
            assert g.finish_reason == "length" and len(g.response_ids) == params.max_new_tokens
    diff = max_diff(gens, reference_logprobs(base_model, prompts, gens, temperature))
    print(f"{type(engine).__name__} T={temperature}: max |logp - HF| = {diff:.2e}")
    assert diff < TOL
    again = engine.generate(prompts, params)
    assert [g.response_ids for g in again] == [g.response_ids for g in gens]  # same seed, same tokens


def test_many_requests_at_once_each_sampled(engine, base_model, prompts):
    """64 requests in one call (a group of 8 copies per prompt): each copy is its own sample."""
    batch = [p for p in prompts[:8] for _ in range(8)]
    gens = engine.generate(batch, SamplingParams(temperature=1.0, max_new_tokens=5, seed=11))
    assert len(gens) == 64
    for k in range(8):
        group = {tuple(g.response_ids) for g in gens[8 * k : 8 * k + 8]}
        assert len(group) > 1, "copies of a prompt must not share one random stream"
    assert max_diff(gens, reference_logprobs(base_model, batch, gens, 1.0)) < TOL


def test_weight_update_changes_logprobs_like_hf(engine, base_model, other_model, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=5)
    before = engine.generate(prompts, params)  # fills the prefix cache with the old weights
    engine.load_weights(pack_weights(other_model.state_dict(), version=3, kind="full"))
    try:
        assert engine.version == 3
        gens = engine.generate(prompts, params)
        diff = max_diff(gens, reference_logprobs(other_model, prompts, gens, 1.0))
        moved = max_diff(gens, reference_logprobs(base_model, prompts, gens, 1.0))
        print(f"after update: |logp - HF(new)| = {diff:.2e}, |logp - HF(old)| = {moved:.2f}")
        assert diff < TOL and moved > 0.1
        assert [g.response_ids for g in gens] != [g.response_ids for g in before]
        with pytest.raises(ValueError, match="does not match this engine"):
            engine.load_weights(WeightPayload(version=4, kind="lora", tensors={}))
        assert engine.version == 3
    finally:  # back to the base weights for the module's other cases
        engine.load_weights(pack_weights(base_model.state_dict(), version=4, kind="full"))
    gens = engine.generate(prompts, params)
    assert max_diff(gens, reference_logprobs(base_model, prompts, gens, 1.0)) < TOL


def test_streamed_full_weights_load_in_place(engine, base_model, other_model, prompts):
    """The loader the broadcast receiver uses: ``(name, tensor)`` pairs, not a packed payload."""
    pytest.importorskip("ray", reason="the broadcast receiver lives in the Ray services")
    from relaxrl.services.broadcast_sync import load_received

    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=6)
    load_received(engine, iter(other_model.state_dict().items()), version=7)
    try:
        assert engine.version == 7
        gens = engine.generate(prompts, params)
        assert max_diff(gens, reference_logprobs(other_model, prompts, gens, 1.0)) < TOL
    finally:
        engine.load_weights(pack_weights(base_model.state_dict(), version=8, kind="full"))


def test_lora_adapter_gives_merged_model_logprobs(lora_engine, base_model, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=2)
    gens = lora_engine.generate(prompts, params)  # version 0: no adapter yet = the base model
    assert max_diff(gens, reference_logprobs(base_model, prompts, gens, 1.0)) < TOL
    for version, seed in ((1, 7), (2, 8)):  # two adapter versions: the second replaces the first
        adapted = lora_model_with_adapter(base_model, seed=seed)
        lora_engine.load_weights(pack_weights(adapter_state_dict(adapted), version=version, kind="lora"))
        assert lora_engine.version == version
        gens = lora_engine.generate(prompts, params)
        diff = max_diff(gens, reference_logprobs(merged(adapted), prompts, gens, 1.0))
        moved = max_diff(gens, reference_logprobs(base_model, prompts, gens, 1.0))
        print(f"adapter v{version}: |logp - merged| = {diff:.2e}, |logp - base| = {moved:.3f}")
        assert diff < TOL and moved > 1e-3
    with pytest.raises(ValueError, match="does not match this engine"):
        lora_engine.load_weights(pack_weights(base_model.state_dict(), version=3, kind="full"))
