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


def test_a_step_at_a_real_vocabulary_never_holds_the_full_logits():
    """At vocab 151,936 the full ``[B, T, vocab]`` fp32 logits of one micro-batch (4 x 512 tokens)
    are 1.16 GB, and their log-softmax as much again; the lean path (the loss mask's positions, the
    head in chunks) is what the torch engine uses, and DeepSpeed's step must use it too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from relaxrl.engines.deepspeed_trainer import DeepSpeedTrainerEngine
    from relaxrl.memory import PeakResident
    from relaxrl.sample import Sample, collate

    torch.manual_seed(0)
    vocab, rows, prompt, response = 151_936, 4, 496, 16
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    g = torch.Generator().manual_seed(1)
    samples = [Sample(uid=f"g{i}/0", group_id=f"g{i}", index=0,
                      prompt_ids=torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                      response_ids=torch.randint(0, vocab, (response,), generator=g).tolist(),
                      behaviour_logprobs=[-12.0] * response, policy_version=0, finish_reason="length")
               for i in range(rows)]
    batch = collate(samples, 0)
    batch.scalars["tokens"] = float(batch.loss_mask.sum())
    trainer = DeepSpeedTrainerEngine(model, lr=1e-3, micro_batch_size=rows, options={"zero_stage": 0})
    trainer.train_step(batch, nll_loss)  # allocator warm-up
    with PeakResident() as mem:
        metrics = trainer.train_step(batch, nll_loss)
    full_logits = rows * (prompt + response) * vocab * 4
    rise = mem.peak - mem.start
    print(f"DeepSpeed step at vocab {vocab:,}: resident rise {rise / 2**30:.2f} GB; full logits {full_logits / 2**30:.2f} GB")
    assert torch.isfinite(torch.tensor(metrics["loss"])) and rise < full_logits / 2
