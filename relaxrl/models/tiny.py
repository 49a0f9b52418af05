"""A deterministic character-level tokenizer and tiny Qwen2/Llama models, built locally.

Nothing here downloads anything: tests and CPU smoke runs need a real HF model and tokenizer
(so the ordinary ``save_pretrained``/``from_pretrained`` paths are exercised) without the hub.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, EOS, UNK, USER, ASSISTANT = "<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, EOS, USER, ASSISTANT, UNK)
# Every printable ASCII character plus newline; order is fixed so ids never change.
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " " + string.punctuation + "\n"

# One turn per message, no system prompt, no separators: keeps sequences short.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<eos>"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCHS = ("qwen2", "llama")


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens first (``<pad>`` = 0, ``<eos>`` = 1), then the characters."""
    tokens = list(SPECIAL_TOKENS) + list(CHARS)
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` with a minimal chat template."""
    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    # Every character is its own pre-token, so WordLevel sees single characters only.
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join tokens without inserting spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def padded_vocab_size(tokenizer: PreTrainedTokenizerFast, multiple: int = 8) -> int:
    """``len(tokenizer)`` rounded up to ``multiple`` (friendlier matmul shapes)."""
    return -(-len(tokenizer) // multiple) * multiple


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> PreTrainedModel:
    """A small randomly initialised causal LM (float32), identical for identical arguments."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(ARCHS)}")
    if hidden_size % num_heads != 0 or hidden_size // num_heads < 32:
        raise ValueError(
            f"hidden_size={hidden_size} / num_heads={num_heads} must divide evenly into a "
            f"head_dim >= 32 (got {hidden_size / num_heads:g})"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    common = dict(
        vocab_size=padded_vocab_size(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,  # no BOS token: prompts start with <|user|>
    )
    if arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    model.eval()
    return model
