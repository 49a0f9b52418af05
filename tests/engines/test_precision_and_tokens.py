"""Engines at real-model conventions: device and dtype, bf16 training with fp32 master weights,
checkpoints that are complete model directories, tokenizers with no pad token and two EOS ids,
and skipped updates that say why."""

from __future__ import annotations

import copy
import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from relaxrl.engines.base import SamplingParams
from relaxrl.engines.device import first_stop, resolve_device, token_ids
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.engines.payload import unpack_weights
from relaxrl.engines.torch_trainer import MODEL_DIR, TorchTrainerEngine
from relaxrl.engines.vllm_generation import to_generation
from relaxrl.models.chat import render_prompt_ids
from relaxrl.models.loading import eos_token_ids, load_model, load_tokenizer, resolve_dtype
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.sample import Sample, collate

EOS, SECOND_EOS = 1, 2  # the tiny tokenizer's <eos>, and <|user|> as a Llama-3-style <|eot_id|>


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base_model(tokenizer):
    """A tiny Qwen2 whose fp32 weights are exactly representable in bf16, so the fp32 and the
    bf16 runs below start from the same weights."""
    return build_tiny_model(tokenizer, seed=0).to(torch.bfloat16).to(torch.float32)


def samples(tokenizer, n=8):
    out = []
    for i in range(n):
        prompt = render_prompt_ids(tokenizer, f"q{i}:" + "ab" * (i % 3))
        response = tokenizer("7" * (1 + i % 4), add_special_tokens=False)["input_ids"] + [EOS]
        out.append(Sample(uid=f"g{i // 4}/{i % 4}", group_id=f"g{i // 4}", index=i % 4, prompt_ids=prompt,
                          response_ids=response, behaviour_logprobs=[-1.0] * len(response)))
    return out


def nll(logp, mb):
    return -(logp * mb.loss_mask).sum() / mb.scalars["tokens"], {}


def batch_of(tokenizer, pad_id=0):
    batch = collate(samples(tokenizer), pad_id)
    batch.scalars["tokens"] = float(batch.loss_mask.sum())
    return batch


def step_delta(engine, batch):
    before = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    engine.train_step(batch, nll)
    after = engine.model.state_dict()
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in before])


# ----------------------------------------------------------------------------- device and dtype


def test_default_device_follows_what_the_process_sees(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


def test_bf16_step_at_lr_1e6_changes_the_weights_as_the_fp32_step_does(base_model, tokenizer):
    batch = batch_of(tokenizer)
    kw = dict(lr=1e-6, max_grad_norm=0.0, micro_batch_size=4, device="cpu")
    fp32 = step_delta(TorchTrainerEngine(copy.deepcopy(base_model), **kw), batch)
    mixed_engine = TorchTrainerEngine(copy.deepcopy(base_model).to(torch.bfloat16), **kw)
    assert mixed_engine.model_dtype == torch.bfloat16 and mixed_engine.train_dtype == torch.float32
    mixed = step_delta(mixed_engine, batch)
    pure = step_delta(TorchTrainerEngine(copy.deepcopy(base_model).to(torch.bfloat16), train_dtype="bfloat16", **kw),
                      batch)
    changed = {name: float((d != 0).float().mean()) for name, d in (("fp32", fp32), ("mixed", mixed), ("pure", pure))}
    assert changed["fp32"] > 0.95, changed
    assert abs(changed["mixed"] - changed["fp32"]) < 0.02, changed
    assert changed["pure"] < 0.2, changed  # why the master copy: bf16 AdamW rounds most updates away
    rel_err = float((mixed - fp32).norm() / fp32.norm())
    assert rel_err < 0.2, rel_err


def test_bf16_exports_and_checkpoints_in_the_models_dtype_and_resumes_from_the_master(base_model, tokenizer, tmp_path):
    src = tmp_path / "src"
    base_model.to(torch.bfloat16).save_pretrained(src)
    base_model.to(torch.float32)
    tokenizer.save_pretrained(src)
    engine = TorchTrainerEngine.from_pretrained(str(src), lr=1e-4, micro_batch_size=4, device="cpu")
    assert engine.model_dtype == torch.bfloat16 and next(engine.model.parameters()).dtype == torch.float32
    engine.train_step(batch_of(tokenizer), nll)
    exported = unpack_weights(engine.export_weights())
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in exported  # tied to the embedding: sent once
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    saved = tmp_path / "ckpt" / MODEL_DIR
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(saved / "model.safetensors").values()} == {torch.bfloat16}
    assert os.path.getsize(saved / "model.safetensors") < 1.1 * os.path.getsize(src / "model.safetensors")
    # A complete model directory: it loads as a model and a tokenizer, in its own dtype.
    assert load_model(saved).dtype == torch.bfloat16
    assert load_tokenizer(saved).encode("7+2") == tokenizer.encode("7+2")
    resumed = TorchTrainerEngine.from_pretrained(str(src), lr=1e-4, micro_batch_size=4, device="cpu")
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    for (k, a), b in zip(engine.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k  # the fp32 master weights, not their bf16 rounding


def test_model_dtype_auto_is_the_directorys_own(base_model, tokenizer, tmp_path):
    base_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    base_model.to(torch.float32).save_pretrained(tmp_path / "fp32")
    assert load_model(tmp_path / "bf16").dtype == torch.bfloat16  # was upcast to float32
    assert load_model(tmp_path / "fp32").dtype == torch.float32
    assert load_model(tmp_path / "bf16", dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="float64"):
        load_model(tmp_path / "fp32", dtype="float64")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # as transformers 4 wrote it
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    assert resolve_dtype(tmp_path / "bf16") == "bfloat16"


def test_train_dtype_is_float32_or_the_models_own(base_model):
    with pytest.raises(ValueError, match="train_dtype=bfloat16 with model.dtype=float32"):
        TorchTrainerEngine(copy.deepcopy(base_model), train_dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="loss scaling"):
        TorchTrainerEngine(copy.deepcopy(base_model).to(torch.float16), device="cpu")


def test_each_engine_logs_its_model_dtype_and_device(base_model, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="relaxrl.engines"):
        TorchTrainerEngine(copy.deepcopy(base_model).to(torch.bfloat16), device="cpu")
        HFGenerationEngine(copy.deepcopy(base_model), tokenizer, device="cpu", role="teacher")
    text = caplog.text
    assert "trainer model: Qwen2ForCausalLM" in text and "bfloat16 on cpu (fp32 master weights)" in text
    assert "teacher model: Qwen2ForCausalLM" in text and "float32 on cpu" in text


# ----------------------------------------------------------------------------- pad and EOS


def llama3_style_dir(tokenizer, path, eos=(EOS, SECOND_EOS)):
    """A tiny Llama whose tokenizer has no pad token and whose generation config lists two EOS ids."""
    model = build_tiny_model(tokenizer, arch="llama", seed=1)
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = list(eos)
    model.save_pretrained(path)
    padless = copy.deepcopy(tokenizer)
    padless.pad_token = None
    padless.save_pretrained(path)
    return str(path)


def test_token_helpers():
    assert token_ids([128001, 128009], 128001) == [128001, 128009]
    assert token_ids(None, 7) == [7] and token_ids(None, None) == []
    assert first_stop([5, 9, 2, 1], [1, 2]) == 2 and first_stop([5, 9], [1, 2]) is None


def test_vllm_completion_stops_at_any_eos_id():
    class Lp:
        logprob = -0.5

    assert to_generation([4, 2], [{4: Lp()}, {2: Lp()}], [EOS, SECOND_EOS], "stop").finish_reason == "stop"
    assert to_generation([4, 5], [{4: Lp()}, {5: Lp()}], [EOS, SECOND_EOS], "length").finish_reason == "length"


def test_every_eos_id_of_the_generation_config_ends_a_response(tokenizer, tmp_path):
    """The response ends at the first of any EOS id: the first greedy token is made an EOS id."""
    prompts = [render_prompt_ids(tokenizer, "q:" + "ab" * i) for i in range(3)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    plain = HFGenerationEngine.from_pretrained(llama3_style_dir(tokenizer, tmp_path / "a"), device="cpu")
    first = plain.generate(prompts[:1], greedy)[0].response_ids[0]
    assert first not in (EOS, SECOND_EOS)
    path = llama3_style_dir(tokenizer, tmp_path / "b", eos=(EOS, first))
    assert eos_token_ids(path, load_tokenizer(path)) == [EOS, first]
    engine = HFGenerationEngine.from_pretrained(path, device="cpu")
    assert engine.eos_ids == [EOS, first] and engine.pad_id == EOS  # no pad token: EOS pads
    gen = engine.generate(prompts[:1], greedy)[0]
    assert gen.response_ids == [first] and gen.finish_reason == "stop"


def test_a_tokenizer_with_no_pad_token_trains(tokenizer, tmp_path):
    path = llama3_style_dir(tokenizer, tmp_path / "m")
    tok = load_tokenizer(path)
    assert tok.pad_token_id is None
    gen = HFGenerationEngine.from_pretrained(path, device="cpu")
    prompts = [render_prompt_ids(tok, f"q{i}:" + "ab" * (i % 3)) for i in range(8)]
    gens = gen.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=5, seed=0))
    batch = collate([Sample(uid=f"g/{i}", group_id="g", index=i, prompt_ids=p, response_ids=g.response_ids,
                            behaviour_logprobs=g.logprobs) for i, (p, g) in enumerate(zip(prompts, gens))],
                    tok.pad_token_id)
    batch.scalars["tokens"] = float(batch.loss_mask.sum())
    trainer = TorchTrainerEngine.from_pretrained(path, lr=1e-3, micro_batch_size=4, device="cpu")
    out = trainer.train_step(batch, nll)
    assert math.isfinite(out["loss"]) and out["skipped"] == 0.0 and out["grad_norm"] > 0
    # Its checkpoint is a complete model directory: a rollout built from it stops at both EOS ids.
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    again = HFGenerationEngine.from_pretrained(str(tmp_path / "ckpt" / MODEL_DIR), device="cpu")
    assert again.eos_ids == [EOS, SECOND_EOS] and again.tokenizer.pad_token_id is None


def test_the_pad_id_never_changes_the_log_probs_of_real_tokens(base_model, tokenizer):
    trainer = TorchTrainerEngine(copy.deepcopy(base_model), micro_batch_size=3, device="cpu")
    by_pad = {pad: (b := batch_of(tokenizer, pad), trainer.logprobs(b)) for pad in (None, 0, EOS, 40)}
    (ref_batch, ref), *others = by_pad.values()
    assert len({tuple(b.input_ids.flatten().tolist()) for b, _ in by_pad.values()}) == 3  # None pads as 0
    real = ref_batch.attention_mask[:, 1:].bool()
    for batch, logp in others:
        assert torch.equal(batch.attention_mask, ref_batch.attention_mask)
        assert float((logp - ref)[real].abs().max()) < 1e-5
    gen = HFGenerationEngine(copy.deepcopy(base_model), tokenizer, device="cpu")
    seqs = [s.prompt_ids + s.response_ids for s in samples(tokenizer)]
    plens = [len(s.prompt_ids) for s in samples(tokenizer)]
    scores = []
    for pad in (0, 40):
        gen.pad_id = pad
        scores.append(gen.score(seqs, plens).logprobs)
    assert max(abs(a - b) for ra, rb in zip(*scores) for a, b in zip(ra, rb)) < 1e-5


# ----------------------------------------------------------------------------- skipped updates


def test_a_skipped_update_is_counted_and_logged_with_its_cause(base_model, tokenizer, caplog):
    trainer = TorchTrainerEngine(copy.deepcopy(base_model), lr=1e-2, micro_batch_size=8, device="cpu")
    batch = batch_of(tokenizer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def nan_loss(logp, mb):
        return (logp * mb.loss_mask).sum() * float("nan"), {}

    def nan_grad(logp, mb):  # a finite loss (0) whose gradient is not: d sqrt(x)/dx at 0
        return torch.sqrt((logp * 0.0).sum().clamp(min=0.0)), {}

    with caplog.at_level(logging.WARNING, logger="relaxrl.engines"):
        first = trainer.train_step(batch, nan_loss)
        second = trainer.train_step(batch, nan_grad)
    assert (first["skipped"], first["skipped_updates"]) == (1.0, 1.0)
    assert (second["skipped"], second["skipped_updates"]) == (1.0, 2.0) and second["loss"] == 0.0
    assert "train step 1: update skipped, non-finite loss=nan (1 skipped so far)" in caplog.text
    assert "train step 2: update skipped, non-finite grad_norm=" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    third = trainer.train_step(batch, nll)
    assert (third["skipped"], third["skipped_updates"]) == (0.0, 2.0)
