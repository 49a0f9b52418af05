"""Trainer engines (torch, DeepSpeed): log-probs equal the HF model's, an update moves them exactly as
the exported weights do in the HF model, LoRA equals the merged model, checkpoints cross engines."""

from __future__ import annotations

import copy

import pytest
import torch

from relaxrl.engines.logprobs import token_logprobs
from relaxrl.engines.payload import load_full_state_dict, unpack_weights
from relaxrl.models.loading import load_model
from relaxrl.models.lora import apply_lora, load_adapter_state_dict
from relaxrl.models.tiny import build_tiny_model

from .helpers import LORA, TOL, TRAINER_KINDS, make_batch, make_trainer, masked_mean, nll_loss

TORCH = ("torch", {})


@pytest.fixture(scope="module")
def batch(tokenizer, base_model, prompts):
    return make_batch(tokenizer, base_model, prompts)


def hf_logprobs(model, batch):
    with torch.no_grad():
        return token_logprobs(model.eval(), batch.input_ids, batch.attention_mask)


def masked_max(a, b, mask) -> float:
    return float(((a - b) * mask).abs().max())


@pytest.mark.parametrize("spec", TRAINER_KINDS)
def test_update_matches_hf_model_and_torch_step(spec, base_model, batch):
    trainer = make_trainer(spec, base_model, warmup_steps=2)
    before = trainer.logprobs(batch)
    assert masked_max(before, hf_logprobs(base_model, batch), batch.loss_mask) < TOL  # same weights
    metrics = trainer.train_step(batch, nll_loss)
    assert trainer.version == 1 and metrics["tokens"] == float(batch.loss_mask.sum())
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(5e-3)
    after = trainer.logprobs(batch)
    assert masked_mean(after, batch.loss_mask) > masked_mean(before, batch.loss_mask) + 0.05

    payload = trainer.export_weights()
    assert payload.kind == "full" and payload.version == 1
    hf = copy.deepcopy(base_model)
    load_full_state_dict(hf, unpack_weights(payload))
    assert masked_max(after, hf_logprobs(hf, batch), batch.loss_mask) < TOL

    reference = make_trainer(TORCH, base_model, warmup_steps=2)  # the same step on the torch engine
    ref_metrics = reference.train_step(batch, nll_loss)
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-5)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-4)
    assert masked_max(after, reference.logprobs(batch), batch.loss_mask) < TOL


@pytest.mark.parametrize("spec", TRAINER_KINDS)
def test_lora_logprobs_are_merged_model_logprobs(spec, base_model, batch):
    trainer = make_trainer(spec, base_model, lora=LORA)
    assert masked_max(trainer.logprobs(batch), hf_logprobs(base_model, batch), batch.loss_mask) < TOL
    trainer.train_step(batch, nll_loss)
    payload = trainer.export_weights()
    assert payload.kind == "lora" and all("lora_" in k for k in unpack_weights(payload))
    peft_model = apply_lora(copy.deepcopy(base_model), LORA)
    load_adapter_state_dict(peft_model, unpack_weights(payload))
    merged_model = peft_model.merge_and_unload()
    after = trainer.logprobs(batch)
    assert masked_max(after, hf_logprobs(base_model, batch), batch.loss_mask) > 1e-3  # the adapter moved
    assert masked_max(after, hf_logprobs(merged_model, batch), batch.loss_mask) < TOL


@pytest.mark.parametrize("spec", TRAINER_KINDS)
@pytest.mark.parametrize("direction", ["to_torch", "from_torch"])
def test_checkpoint_resumes_on_the_other_engine(spec, direction, base_model, batch, tmp_path, tokenizer):
    """A model trained on one engine is resumed by the other: weights, version and schedule carry over."""
    src_spec, dst_spec = (spec, TORCH) if direction == "to_torch" else (TORCH, spec)
    src = make_trainer(src_spec, base_model, warmup_steps=3)
    src.train_step(batch, nll_loss)
    src.save_checkpoint(str(tmp_path / "ckpt"))
    saved = src.logprobs(batch)
    # The HF model dir in the checkpoint serves directly (e.g. a vLLM rollout started from it).
    served = load_model(str(tmp_path / "ckpt" / "model"))
    assert masked_max(hf_logprobs(served, batch), saved, batch.loss_mask) < TOL

    dst = make_trainer(dst_spec, build_tiny_model(tokenizer, seed=4), warmup_steps=3)
    dst.load_checkpoint(str(tmp_path / "ckpt"))
    assert dst.version == 1
    assert masked_max(dst.logprobs(batch), saved, batch.loss_mask) < TOL
    m_src, m_dst = src.train_step(batch, nll_loss), dst.train_step(batch, nll_loss)
    assert m_dst["lr"] == m_src["lr"] and dst.version == 2
