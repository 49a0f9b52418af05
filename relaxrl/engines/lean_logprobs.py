"""Log-probs of the tokens a loss needs, without materialising ``[batch, width, vocab]`` logits.

At a real vocabulary (151,936) the fp32 logits of one 8 x 512 micro-batch are 2.5 GB, and autograd
keeps several tensors of that size for the backward of ``log_softmax``. Here the model body runs
once, and the output head runs only on the positions selected (the response tokens), a chunk of
positions at a time, under activation checkpointing: the backward recomputes a chunk's logits
instead of keeping them, so at most one chunk's ``[chunk, vocab]`` logits (and their gradient) are
alive at once. Values and gradients equal the full-logits path (``logprobs.token_logprobs``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from relaxrl.engines.logprobs import position_ids_from_mask

DEFAULT_CHUNK_TOKENS = 256  # positions per output-head chunk: [256, 151936] fp32 logits = 0.16 GB


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder body and the output head of an HF causal LM (peft- or DeepSpeed-wrapped or not)."""
    if not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module  # a DeepSpeedEngine: its hooks sit on the module's submodules
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None:
        raise TypeError(f"{type(base).__name__} exposes no decoder/output head (get_decoder, "
                        "get_output_embeddings): the lean log-prob path needs an HF causal LM")
    return decoder, head


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if temperature != 1.0:  # one [chunk, vocab] copy fewer at the common T = 1
        logits = logits / temperature
    lse = logits.logsumexp(-1)
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return chosen, torch.zeros((), device=logits.device)
    with torch.no_grad():  # a metric: no gradient, summed over the chunk's positions
        probs = torch.softmax(logits, dim=-1)
        entropy = (lse - (probs * logits).sum(-1)).sum()
    return chosen, entropy


def selected_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    select: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``[B, T-1]`` float32 log-probs of ``input_ids[:, 1:]`` at the positions where ``select``
    (``[B, T-1]``, e.g. the loss mask) is non-zero, and 0 elsewhere; with ``with_entropy`` also the
    mean entropy of the sampling distribution over those positions (no gradient).

    Same alignment and temperature rule as ``token_logprobs`` (``temperature <= 0`` means 1).
    Gradients flow to the model unless the caller disables them."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    temperature = temperature if temperature > 0 else 1.0
    decoder, head = causal_lm_parts(model)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    where = select.to(device) != 0
    rows, cols = where.nonzero(as_tuple=True)
    picked = hidden[:, :-1][rows, cols]  # [N, H]: only the positions a loss reads
    targets = input_ids[:, 1:][rows, cols]
    parts, entropy = [], torch.zeros((), device=device)
    needs_grad = torch.is_grad_enabled() and picked.requires_grad
    for start in range(0, picked.shape[0], chunk_tokens):
        h, t = picked[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if needs_grad:  # keep only h for the backward; the chunk's logits are recomputed there
            lp, ent = checkpoint(_chunk_logprobs, head, h, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(head, h, t, temperature, with_entropy)
        parts.append(lp)
        entropy = entropy + ent
    out = torch.zeros(where.shape, dtype=torch.float32, device=device)
    if parts:
        out = out.index_put((rows, cols), torch.cat(parts))
    mean_entropy = entropy / max(int(rows.numel()), 1) if with_entropy else None
    return out, mean_entropy


def batched_token_logprobs(model: torch.nn.Module, batch, micro_batch_size: int, temperature: float) -> torch.Tensor:
    """``[B, T-1]`` float32 log-probs of a ``TensorBatch`` at every real target position (0 on
    padding), on CPU, no grad, in micro-batches: the trainer engines' ``logprobs``. The model is left
    in the mode it was in."""
    was_training = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, batch.size, micro_batch_size):
            mb = batch.rows(start, start + micro_batch_size)
            logp, _ = selected_token_logprobs(model, mb.input_ids, mb.attention_mask, mb.attention_mask[:, 1:],
                                              temperature)
            parts.append(logp.float().cpu())
    model.train(was_training)
    return torch.cat(parts)
