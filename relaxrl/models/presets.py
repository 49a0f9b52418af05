"""Named architectures for real-shaped model directories: Qwen2.5-0.5B and smaller relatives.

Every preset keeps its family's real vocabulary size (151,936 for Qwen2.5, 128,256 for Llama-3),
which is what the embedding, the LM head, the logits and so memory and speed depend on; the
tokenizer trained for it (``bpe_vocab`` tokens) may be smaller: ids past it are never produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from relaxrl.models.bpe import BPESpec

FAMILIES = ("qwen2", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QWEN_VOCAB = 151_936  # Qwen2.5's embedding rows (151,665 tokens padded for matmuls)
LLAMA3_VOCAB = 128_256


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # qwen2 (ChatML, pad <|endoftext|>) | llama3 (header template, no pad, two EOS)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # the model's embedding rows
    bpe_vocab: int  # trained tokenizer tokens before the special tokens
    corpus_bytes: int  # text the tokenizer is trained on
    dtype: str  # the dtype the weights are saved in
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"preset {self.name!r}: unknown family {self.family!r}; valid: {list(FAMILIES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"preset {self.name!r}: unknown dtype {self.dtype!r}; valid: {list(DTYPES)}")
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            # vLLM's CPU attention rejects head dims below 32
            raise ValueError(
                f"preset {self.name!r}: hidden_size {self.hidden_size} / num_heads {self.num_heads} "
                "must divide evenly into a head dim >= 32"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"preset {self.name!r}: num_heads must be a multiple of num_kv_heads")

    @property
    def bpe(self) -> BPESpec:
        return BPESpec(vocab_size=self.bpe_vocab, corpus_bytes=self.corpus_bytes, pattern=self.family)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


_QWEN = dict(family="qwen2", vocab_size=QWEN_VOCAB, max_position_embeddings=32768, rope_theta=1_000_000.0,
             rms_norm_eps=1e-6)
_LLAMA3 = dict(family="llama3", vocab_size=LLAMA3_VOCAB, max_position_embeddings=8192, rope_theta=500_000.0,
               rms_norm_eps=1e-5)
# One 32k tokenizer (8 MB of text, ~6 s to train on 2 cores) shared by the larger presets; the tiny
# ones train 4k tokens on 1 MB in well under a second, for tests.
_BIG_BPE = dict(bpe_vocab=32_000, corpus_bytes=8_000_000)
_SMALL_BPE = dict(bpe_vocab=4_096, corpus_bytes=1_000_000)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qwen2.5-0.5b", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
               intermediate_size=4864, dtype="bfloat16", **_QWEN, **_BIG_BPE),
        Preset("qwen-mid-152k", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
               intermediate_size=1408, dtype="bfloat16", **_QWEN, **_BIG_BPE),
        Preset("qwen-tiny-152k", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, dtype="float32", **_QWEN, **_SMALL_BPE),
        Preset("llama3-tiny", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, dtype="float32", **_LLAMA3, **_SMALL_BPE),
    )
}  # fmt: skip


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]


def model_config(preset: Preset, *, bos_id: int | None = None, eos_id: int | None = None) -> PretrainedConfig:
    """The HF config of ``preset`` with the tokenizer's special ids where given; no pad id, as in the
    hub's config.json files of both families (the pad token, if any, is the tokenizer's)."""
    common = dict(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_position_embeddings,
        rope_theta=preset.rope_theta,
        rms_norm_eps=preset.rms_norm_eps,
        tie_word_embeddings=preset.tie_word_embeddings,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        use_cache=True,
    )
    if preset.family == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False, sliding_window=None,
                             max_window_layers=preset.num_layers, attention_dropout=0.0)  # fmt: skip
    else:
        config = LlamaConfig(**common, attention_bias=False, mlp_bias=False, head_dim=preset.hidden_size // preset.num_heads)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = preset.torch_dtype
    return config
