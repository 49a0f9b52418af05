"""The one implementation of "log-prob of each target token of a padded batch"."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over each row's real tokens, whether the row is left- or right-padded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _scaled_logits(model, input_ids, attention_mask, temperature):
    device = next(model.parameters()).device
    attention_mask = attention_mask.to(device)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits[:, :-1]
    return logits.float() / (temperature if temperature > 0 else 1.0)


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[B, T-1]`` log-probs of ``input_ids[:, 1:]`` under ``softmax(logits / temperature)``.

    Column ``t`` is the log-prob of token ``t+1`` given tokens ``..t`` (the ``TensorBatch``
    alignment); ``temperature <= 0`` (greedy) means 1. Gradients flow unless the caller disables
    them. Padding may be on either side: positions are counted over the attention mask.
    """
    logits = _scaled_logits(model, input_ids, attention_mask, temperature)
    targets = input_ids[:, 1:].to(logits.device).unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs_topk(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_logprobs`` plus the ``[B, T-1, k]`` ids and log-probs of the k likeliest tokens."""
    logits = _scaled_logits(model, input_ids, attention_mask, temperature)
    lse = logits.logsumexp(-1)
    chosen = logits.gather(-1, input_ids[:, 1:].to(logits.device).unsqueeze(-1)).squeeze(-1) - lse
    top_logits, top_ids = logits.topk(k, dim=-1)
    return chosen, top_ids, top_logits - lse.unsqueeze(-1)


def gather_response(values: torch.Tensor, prompt_lens: list[int], lengths: list[int]) -> list[list]:
    """Per-row slices ``values[i, p-1 : p-1+n]`` (the response columns of a right-padded batch)."""
    return [values[i, p - 1 : p - 1 + n].tolist() for i, (p, n) in enumerate(zip(prompt_lens, lengths))]


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for token-id lists."""
    return _padded(sequences, pad_id, left=False)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (for generation)."""
    return _padded(sequences, pad_id, left=True)


def _padded(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Built as Python lists and converted once: a tensor per row cost ~4x more (4.4 vs 1.2 ms for
    # 128 prompts of 28 tokens), on the rollout's critical path before every generate call.
    width = max(len(s) for s in sequences)
    ids, mask = [], []
    for s in sequences:
        pad = width - len(s)
        ids.append([pad_id] * pad + list(s) if left else list(s) + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(s) if left else [1] * len(s) + [0] * pad)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

