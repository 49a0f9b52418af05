"""DeepSpeed options the contract suite does not cover: bf16 with gradient checkpointing, and a
ZeRO-1 checkpoint (sharded optimizer state) resuming exactly on DeepSpeed. Skipped without deepspeed."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from .contract.helpers import make_batch, masked_mean, nll_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (runs in .ci/run's engines venv)",
)


@pytest.fixture(scope="module")
def setup():
    from relaxrl.models.chat import render_prompt_ids
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0)
    prompts = [render_prompt_ids(tok, f"q{i}:" + "ab" * (i % 5)) for i in range(8)]
    return tok, model, make_batch(tok, model, prompts)


def test_bf16_gradient_checkpointing_learns(setup):
    from relaxrl.engines.deepspeed_trainer import DeepSpeedTrainerEngine

    tok, model, batch = setup
    trainer = DeepSpeedTrainerEngine(
        copy.deepcopy(model), lr=1e-2, micro_batch_size=4,
        options={"zero_stage": 1, "bf16": True, "gradient_checkpointing": True},
    )
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert trainer.model.is_gradient_checkpointing
    before = masked_mean(trainer.logprobs(batch), batch.loss_mask)
    for _ in range(3):
        metrics = trainer.train_step(batch, nll_loss)
    after = masked_mean(trainer.logprobs(batch), batch.loss_mask)
    print(f"bf16 + checkpointing: mean logp {before:.3f} -> {after:.3f}")
    assert metrics["grad_norm"] > 0 and after > before + 0.1


def test_zero1_checkpoint_resumes_exactly(setup, tmp_path):
    from relaxrl.engines.deepspeed_trainer import DS_DIR, DeepSpeedTrainerEngine
    from relaxrl.models.tiny import build_tiny_model

    tok, model, batch = setup
    kwargs = dict(lr=1e-2, micro_batch_size=4, warmup_steps=3, options={"zero_stage": 1})
    a = DeepSpeedTrainerEngine(copy.deepcopy(model), **kwargs)
    a.train_step(batch, nll_loss)
    a.save_checkpoint(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / DS_DIR).is_dir() and (tmp_path / "ckpt" / "model" / "config.json").is_file()
    b = DeepSpeedTrainerEngine(build_tiny_model(tok, seed=3), **kwargs)
    b.load_checkpoint(str(tmp_path / "ckpt"))
    assert b.version == 1
    assert float(((a.logprobs(batch) - b.logprobs(batch)) * batch.loss_mask).abs().max()) == 0.0
    ma, mb = a.train_step(batch, nll_loss), b.train_step(batch, nll_loss)
    assert ma["lr"] == mb["lr"] and ma["loss"] == mb["loss"]  # AdamW moments carried over exactly
    assert float(((a.logprobs(batch) - b.logprobs(batch)) * batch.loss_mask).abs().max()) == 0.0
