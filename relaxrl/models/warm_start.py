"""A short supervised fine-tune so RL starts from a policy that is sometimes right.

A randomly initialised tiny model never emits a correct answer, so RL on it has no signal; a
few SFT steps on (prompt, answer) pairs give a non-zero but imperfect starting accuracy.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from relaxrl.models.chat import render_prompt_ids

log = logging.getLogger(__name__)
IGNORE = -100


def encode_pair(tokenizer: Any, prompt: str, answer: str,
                prompt_template: Optional[str] = None) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt, rendered as the policy will see it in RL (``env.prompt_template``
    when set, else the chat template), is masked out; the answer and EOS are learned."""
    prompt_ids = render_prompt_ids(tokenizer, prompt, prompt_template)
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def pad_batch(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) pairs into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(encoded):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, mask, labels


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer + EOS) tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def _batches(n: int, batch_size: int, rng: random.Random):
    """Endless minibatches of indices: shuffled epochs, so every pair is seen once per epoch."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch


def warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    prompt_template: Optional[str] = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``pairs`` for ``steps`` AdamW steps; returns loss metrics.
    ``prompt_template``: render prompts with it (``env.prompt_template``) instead of the chat template."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    if steps > 0 and not pairs:
        raise ValueError("warm_start needs at least one (prompt, answer) pair")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("warm_start needs a tokenizer with eos and pad tokens")
    torch.manual_seed(seed)  # dropout, if the model has any
    rng = random.Random(seed)
    encoded = [encode_pair(tokenizer, p, a, prompt_template) for p, a in pairs]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    losses: list[float] = []
    batches = _batches(len(encoded), batch_size, rng)
    for _ in range(steps):
        ids, mask, labels = pad_batch([encoded[i] for i in next(batches)], tokenizer.pad_token_id)
        loss = sft_loss(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.train(was_training)
    tail = losses[-10:]
    metrics = {
        "steps": steps,
        "prompt": "chat template" if prompt_template is None else prompt_template,
        "initial_loss": losses[0] if losses else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "final_loss_avg10": sum(tail) / len(tail) if tail else float("nan"),
    }
    log.info("warm start: %d steps, loss %.4f -> %.4f", steps, metrics["initial_loss"], metrics["final_loss"])
    return metrics
