"""The lean log-prob path equals the full-logits one, in value and gradient."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from relaxrl.engines.lean_logprobs import selected_token_logprobs
from relaxrl.engines.logprobs import right_pad, token_logprobs


def _model(vocab=3001, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=96, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


def _batch(vocab, lengths=(5, 23, 11), prompt=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    ids, attn = right_pad(seqs, pad_id=0)
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for i, n in enumerate(lengths):
        mask[i, prompt - 1:n - 1] = 1.0  # response tokens only
    return ids, attn, mask


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (0.7, 1024), (0.0, 1)])
def test_values_and_gradients_equal_the_full_logits_path(temperature, chunk):
    model = _model()
    ids, attn, mask = _batch(3001)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))

    full = token_logprobs(model, ids, attn, temperature)
    (full * mask * weights).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    lean, _ = selected_token_logprobs(model, ids, attn, mask, temperature, chunk_tokens=chunk)
    (lean * mask * weights).sum().backward()
    grads = _grads(model)

    assert lean.dtype == torch.float32 and lean.shape == mask.shape
    assert torch.equal(lean[mask == 0], torch.zeros(int((mask == 0).sum())))
    torch.testing.assert_close(lean[mask == 1], full[mask == 1].detach(), atol=1e-5, rtol=0)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_entropy_is_the_mean_over_selected_positions():
    model = _model()
    ids, attn, mask = _batch(3001)
    with torch.no_grad():
        _, entropy = selected_token_logprobs(model, ids, attn, mask, 0.7, chunk_tokens=5, with_entropy=True)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.7
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        expected = (ent * mask).sum() / mask.sum()
    torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=0)


def test_lora_model_matches_too():
    from relaxrl.models.lora import LoraConfig, apply_lora

    model = apply_lora(_model(), LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    ids, attn, mask = _batch(3001)
    with torch.no_grad():
        for p in model.parameters():  # non-zero adapters, so LoRA changes the result
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        full = token_logprobs(model, ids, attn, 1.0)
        lean, _ = selected_token_logprobs(model, ids, attn, mask, 1.0, chunk_tokens=4)
    torch.testing.assert_close(lean[mask == 1], full[mask == 1], atol=1e-5, rtol=0)


def test_nothing_selected_gives_zeros():
    model = _model()
    ids, attn, mask = _batch(3001)
    out, entropy = selected_token_logprobs(model, ids, attn, torch.zeros_like(mask), with_entropy=True)
    assert torch.equal(out, torch.zeros_like(mask)) and float(entropy) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_generation_records_logprobs_without_keeping_every_steps_logits(temperature):
    """Behaviour log-probs equal the trainer's on the same tokens, and generate() is never asked
    for the logits of every step (new_tokens x [B, vocab] fp32)."""
    from relaxrl.engines.base import SamplingParams
    from relaxrl.engines.hf_generation import HFGenerationEngine
    from relaxrl.models.tiny import build_tokenizer

    tok = build_tokenizer()
    model = _model(vocab=3001)
    engine = HFGenerationEngine(model, tok)
    seen = {}
    original = engine.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    engine.model.generate = spy
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    gens = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=6, seed=3))
    assert not seen.get("output_logits") and not seen.get("output_scores")
    seqs = [p + g.response_ids for p, g in zip(prompts, gens)]
    ids, attn = right_pad(seqs, pad_id=0)
    with torch.no_grad():
        ref = token_logprobs(model, ids, attn, temperature)
    for i, (p, g) in enumerate(zip(prompts, gens)):
        expected = ref[i, len(p) - 1:len(p) - 1 + len(g.response_ids)]
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-5, rtol=0)
