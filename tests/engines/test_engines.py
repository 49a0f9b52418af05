"""Engines on a tiny randomly initialised Qwen2: sampling, log-prob agreement, training, weight sync."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from relaxrl.engines.base import SamplingParams, WeightPayload
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.engines.payload import pack_weights, unpack_weights
from relaxrl.engines.torch_trainer import TorchTrainerEngine
from relaxrl.models.chat import render_prompt_ids
from relaxrl.models.lora import LoraConfig
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.sample import Sample, collate

LORA = LoraConfig(enabled=True, r=4, alpha=8)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base_model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """16 chat prompts of different lengths (so generation left-pads and training right-pads)."""
    return [render_prompt_ids(tokenizer, f"q{i}:" + "ab" * (i % 5)) for i in range(16)]


def fresh(model):
    return copy.deepcopy(model)


def to_samples(prompts, gens, version=0):
    return [
        Sample(
            uid=f"g{i}/0",
            group_id=f"g{i // 4}",
            index=i % 4,
            prompt_ids=list(p),
            response_ids=g.response_ids,
            behaviour_logprobs=g.logprobs,
            policy_version=version,
            finish_reason=g.finish_reason,
        )
        for i, (p, g) in enumerate(zip(prompts, gens))
    ]


def nll_loss(logp, mb):
    """-sum of masked log-probs over the *whole batch's* token count (set in batch.scalars)."""
    loss = -(logp * mb.loss_mask).sum() / mb.scalars["tokens"]
    return loss, {"mean_logp": float((logp.detach() * mb.loss_mask).sum() / mb.loss_mask.sum().clamp(min=1))}


def rollout_batch(engine, prompts, tokenizer, params=SamplingParams(temperature=1.0, max_new_tokens=4, seed=0)):
    gens = engine.generate(prompts, params)
    batch = collate(to_samples(prompts, gens, engine.version), tokenizer.pad_token_id)
    batch.scalars["tokens"] = float(batch.loss_mask.sum())
    return gens, batch


def masked_max_diff(a, b, mask):
    return float(((a - b) * mask).abs().max())


def state_max_diff(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    return max(float((s1[k] - s2[k]).abs().max()) for k in s1)


# --------------------------------------------------------------------------- generation


def test_generate_stops_at_eos_or_length(tokenizer, base_model, prompts):
    model = fresh(base_model)
    with torch.no_grad():  # point the (tied) EOS row along the hidden states so EOS is sometimes sampled
        h = model(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states[-1][0]
        model.model.embed_tokens.weight[tokenizer.eos_token_id] = 0.7 * h.mean(0) / h.mean(0).norm()
    engine = HFGenerationEngine(model, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=0)
    gens = engine.generate(prompts, params)
    assert len(gens) == len(prompts)
    eos = tokenizer.eos_token_id
    for g in gens:
        assert len(g.logprobs) == len(g.response_ids) > 0
        assert all(lp <= 0 for lp in g.logprobs)
        if g.finish_reason == "stop":
            assert g.response_ids[-1] == eos and eos not in g.response_ids[:-1]
            assert len(g.response_ids) <= params.max_new_tokens
        else:
            assert g.finish_reason == "length"
            assert len(g.response_ids) == params.max_new_tokens and eos not in g.response_ids
    reasons = {g.finish_reason for g in gens}
    assert reasons == {"stop", "length"}, [g.response_ids for g in gens]
    assert any(len(g.response_ids) < params.max_new_tokens for g in gens)

    again = engine.generate(prompts, params)
    assert [g.response_ids for g in again] == [g.response_ids for g in gens]
    assert [g.logprobs for g in again] == [g.logprobs for g in gens]
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, seed=1))
    assert [g.response_ids for g in other] != [g.response_ids for g in gens]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_trainer(tokenizer, base_model, prompts, temperature):
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    trainer = TorchTrainerEngine(fresh(base_model), lr=1e-3, temperature=temperature)
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=5, seed=3)
    _, batch = rollout_batch(gen, prompts, tokenizer, params)
    assert len({len(p) for p in prompts}) > 1  # left padding in generate, right padding here
    diff = masked_max_diff(trainer.logprobs(batch), batch.behaviour_logprobs, batch.loss_mask)
    assert diff < 1e-4, diff


def test_greedy_is_argmax_with_temperature_one_logprobs(tokenizer, base_model, prompts):
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    gens, batch = rollout_batch(gen, prompts[:4], tokenizer, params)
    assert [g.response_ids for g in gen.generate(prompts[:4], params)] == [g.response_ids for g in gens]
    with torch.no_grad():
        first = fresh(base_model)(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    assert gens[0].response_ids[0] == int(first.argmax())
    assert abs(gens[0].logprobs[0] - float(torch.log_softmax(first, -1).max())) < 1e-4
    trainer = TorchTrainerEngine(fresh(base_model), lr=1e-3, temperature=1.0)
    assert masked_max_diff(trainer.logprobs(batch), batch.behaviour_logprobs, batch.loss_mask) < 1e-4


def test_score_matches_trainer_and_topk(tokenizer, base_model, prompts):
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    gens, batch = rollout_batch(gen, prompts[:6], tokenizer)
    seqs = [list(p) + g.response_ids for p, g in zip(prompts, gens)]
    scored = gen.score(seqs, [len(p) for p in prompts[:6]], top_k=3, batch_size=4)
    for g, lps, ids, tops in zip(gens, scored.logprobs, scored.topk_ids, scored.topk_logprobs):
        assert len(lps) == len(ids) == len(tops) == len(g.response_ids)
        assert max(abs(a - b) for a, b in zip(lps, g.logprobs)) < 1e-4
        for lp, top in zip(lps, tops):  # sorted top-k, and the chosen token is no likelier than the best
            assert len(top) == 3 and top[0] >= top[1] >= top[2] and lp <= top[0] + 1e-6
    assert gen.score(seqs, [len(p) for p in prompts[:6]]).topk_ids is None


# --------------------------------------------------------------------------- payloads


def test_payload_round_trip_skips_tied_weight(tokenizer, base_model):
    payload = pack_weights(base_model.state_dict(), version=7, kind="full")
    state = unpack_weights(payload)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    other = build_tiny_model(tokenizer, seed=1)
    engine = HFGenerationEngine(other, tokenizer)
    engine.load_weights(payload)
    assert engine.version == 7
    assert state_max_diff(other, base_model) == 0.0
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="do not match the model"):
        engine.load_weights(pack_weights({"bogus": torch.zeros(2)}, version=8, kind="full"))


# --------------------------------------------------------------------------- training


def test_train_step_raises_logprob_and_accumulates_exactly(tokenizer, base_model, prompts):
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    _, batch = rollout_batch(gen, prompts, tokenizer)
    engines = {mbs: TorchTrainerEngine(fresh(base_model), lr=1e-3, micro_batch_size=mbs) for mbs in (2, 8)}
    before = engines[2].logprobs(batch)
    metrics = {mbs: e.train_step(batch, nll_loss) for mbs, e in engines.items()}
    m = metrics[2]
    assert engines[2].version == 1 and engines[8].version == 1
    assert {"loss", "grad_norm", "lr", "tokens", "train_time_s", "mean_logp"} <= set(m)
    assert m["tokens"] == float(batch.loss_mask.sum()) == 64.0
    assert m["lr"] == pytest.approx(1e-3) and m["grad_norm"] > 0
    # the loss is -mean logp over the batch's tokens; the metric is the row-weighted mean of per-mb means
    mean_before = float((before * batch.loss_mask).sum() / batch.loss_mask.sum())
    assert m["loss"] == pytest.approx(-mean_before, abs=1e-4)
    assert m["mean_logp"] == pytest.approx(mean_before, abs=1e-4)
    after = engines[2].logprobs(batch)
    mean_after = float((after * batch.loss_mask).sum() / batch.loss_mask.sum())
    print(f"mean logp {mean_before:.4f} -> {mean_after:.4f}")
    assert mean_after > mean_before + 0.05
    assert metrics[8]["loss"] == pytest.approx(m["loss"], abs=1e-5)
    assert metrics[8]["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-4)
    assert state_max_diff(engines[2].model, engines[8].model) < 1e-5


def test_warmup_schedule(base_model, tokenizer, prompts):
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    _, batch = rollout_batch(gen, prompts[:4], tokenizer)
    trainer = TorchTrainerEngine(fresh(base_model), lr=1e-3, warmup_steps=4)
    lrs = [trainer.train_step(batch, nll_loss)["lr"] for _ in range(5)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_export_full_weights_sync_generation(tokenizer, base_model, prompts):
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    trainer = TorchTrainerEngine(fresh(base_model), lr=1e-3)
    _, batch = rollout_batch(gen, prompts, tokenizer)
    trainer.train_step(batch, nll_loss)
    payload = trainer.export_weights()
    assert payload.kind == "full" and payload.version == 1
    gen.load_weights(payload)
    assert gen.version == 1
    _, batch2 = rollout_batch(gen, prompts, tokenizer, SamplingParams(max_new_tokens=4, seed=5))
    assert masked_max_diff(trainer.logprobs(batch2), batch2.behaviour_logprobs, batch2.loss_mask) < 1e-4
    with pytest.raises(ValueError, match="LoRA"):
        gen.load_weights(WeightPayload(version=2, kind="lora", tensors=payload.tensors))


def test_lora_adapter_sync(tokenizer, base_model, prompts):
    full_bytes = pack_weights(base_model.state_dict(), version=0, kind="full").nbytes
    gen = HFGenerationEngine(fresh(base_model), tokenizer, lora=LORA)
    trainer = TorchTrainerEngine(fresh(base_model), lr=1e-2, lora=LORA)
    n_trainable = sum(p.numel() for p in trainer.params)
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    _, batch = rollout_batch(gen, prompts, tokenizer)
    # adapters start as a no-op (B = 0): the LoRA policy equals the base policy
    assert masked_max_diff(trainer.logprobs(batch), batch.behaviour_logprobs, batch.loss_mask) < 1e-4
    base_before = {k: v.clone() for k, v in trainer.model.get_base_model().state_dict().items() if "lora_" not in k}
    before = trainer.logprobs(batch)
    trainer.train_step(batch, nll_loss)
    after = trainer.logprobs(batch)
    assert float((after * batch.loss_mask).sum()) > float((before * batch.loss_mask).sum())
    base_after = trainer.model.get_base_model().state_dict()
    assert all(torch.equal(v, base_after[k]) for k, v in base_before.items())  # base weights frozen

    payload = trainer.export_weights()
    keys = list(unpack_weights(payload))
    print(f"LoRA payload {payload.nbytes} bytes vs full payload {full_bytes} bytes; {n_trainable} adapter params")
    assert payload.kind == "lora" and payload.version == 1
    assert keys and all("lora_" in k for k in keys)
    assert payload.nbytes < 0.2 * full_bytes
    gen.load_weights(payload)
    assert gen.version == 1
    _, batch2 = rollout_batch(gen, prompts, tokenizer, SamplingParams(max_new_tokens=4, seed=9))
    assert masked_max_diff(trainer.logprobs(batch2), batch2.behaviour_logprobs, batch2.loss_mask) < 1e-4
    with pytest.raises(ValueError, match="does not match this engine"):
        gen.load_weights(pack_weights(base_model.state_dict(), version=2, kind="full"))
    assert gen.version == 1


# --------------------------------------------------------------------------- checkpoints / loading


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_checkpoint_round_trip_continues_exactly(tokenizer, base_model, prompts, tmp_path, lora):
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    _, batch = rollout_batch(gen, prompts[:8], tokenizer)
    kwargs = dict(lr=1e-2, warmup_steps=3, micro_batch_size=4, lora=lora)
    a = TorchTrainerEngine(fresh(base_model), **kwargs)
    a.train_step(batch, nll_loss)
    a.save_checkpoint(str(tmp_path / "ckpt"))
    # A LoRA checkpoint holds only the adapter: the base must be the same pretrained model.
    start = fresh(base_model) if lora else build_tiny_model(tokenizer, seed=3)
    b = TorchTrainerEngine(start, seed=5, **kwargs)  # different weights / adapter init / RNG
    assert state_max_diff(a.model, b.model) > 0
    b.load_checkpoint(str(tmp_path / "ckpt"))
    assert b.version == 1
    assert state_max_diff(a.model, b.model) == 0.0
    ma, mb = a.train_step(batch, nll_loss), b.train_step(batch, nll_loss)
    assert ma["lr"] == mb["lr"] and ma["loss"] == mb["loss"]
    assert state_max_diff(a.model, b.model) == 0.0
    assert a.version == b.version == 2
    assert unpack_weights(a.export_weights()).keys() == unpack_weights(b.export_weights()).keys()


def test_from_pretrained(tokenizer, base_model, prompts, tmp_path):
    pytest.importorskip("relaxrl.models.loading", reason="relaxrl.models.loading is not written yet")
    fresh(base_model).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    gen = HFGenerationEngine.from_pretrained(str(tmp_path))
    trainer = TorchTrainerEngine.from_pretrained(str(tmp_path), lr=1e-3, temperature=0.7)
    _, batch = rollout_batch(gen, prompts[:4], tokenizer, SamplingParams(temperature=0.7, max_new_tokens=4, seed=2))
    assert masked_max_diff(trainer.logprobs(batch), batch.behaviour_logprobs, batch.loss_mask) < 1e-4
    ref = TorchTrainerEngine(fresh(base_model), lr=1e-3, temperature=0.7)
    assert masked_max_diff(trainer.logprobs(batch), ref.logprobs(batch), batch.loss_mask) < 1e-5
    lora_gen = HFGenerationEngine.from_pretrained(str(tmp_path), lora=LORA)
    assert lora_gen.lora_on and gen.tokenizer.pad_token_id == tokenizer.pad_token_id


def test_timing(tokenizer, base_model, prompts):
    """Not a benchmark: prints the cost of one generate (16 prompts x 4 tokens) and one train_step."""
    gen = HFGenerationEngine(fresh(base_model), tokenizer)
    trainer = TorchTrainerEngine(fresh(base_model), lr=1e-3)
    params = SamplingParams(max_new_tokens=4, seed=0)
    gen.generate(prompts, params)
    t0 = time.perf_counter()
    for _ in range(3):
        _, batch = rollout_batch(gen, prompts, tokenizer, params)
    gen_s = (time.perf_counter() - t0) / 3
    trainer.train_step(batch, nll_loss)
    step_s = sum(trainer.train_step(batch, nll_loss)["train_time_s"] for _ in range(3)) / 3
    print(f"generate 16x4: {gen_s * 1000:.1f} ms; train_step (16 rows): {step_s * 1000:.1f} ms")
    assert gen_s < 5 and step_s < 5
