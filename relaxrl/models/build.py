"""Real-shaped model directories built offline: a hub-like Qwen2.5 or Llama-3 directory with random weights.

A directory holds what a hub download holds (config.json, generation_config.json, model.safetensors
in the preset's dtype, tokenizer.json + tokenizer_config.json with the family's special tokens and
chat template) and loads with ``model=local model.path=DIR``. Only the weights are random and the
tokenizer is a locally trained byte-level BPE (``relaxrl.models.bpe``)::

    python -m relaxrl.models.build --preset qwen2.5-0.5b --out /tmp/qwen-0.5b
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from tokenizers import AddedToken, Tokenizer, processors
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, Qwen2ForCausalLM

from relaxrl.models.bpe import cached_bpe, corpus_key
from relaxrl.models.presets import PRESETS, Preset, get_preset, model_config

FORMAT_VERSION = 1  # bump when what a directory holds changes, to invalidate cached directories
MARKER = "relaxrl_build.json"

# Qwen2-Instruct's ChatML template (a default system prompt when none is given).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-Instruct's template: BOS in the text of the first turn, headers, <|eot_id|> after each turn.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Llama-3.1's first eleven special tokens, in its order (the same offsets past the trained vocab).
LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)  # fmt: skip


def build_tokenizer(preset: Preset, cache_dir: Optional[os.PathLike] = None) -> PreTrainedTokenizerFast:
    """The preset family's tokenizer: a cached locally trained BPE plus the family's specials and template."""
    core = cached_bpe(preset.bpe, cache_dir)
    if preset.family == "qwen2":
        return _qwen_tokenizer(core)
    return _llama3_tokenizer(core)


def _add_specials(core: Tokenizer, names: Sequence[str]) -> dict[str, int]:
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    return {t: core.token_to_id(t) for t in names}


def _qwen_tokenizer(core: Tokenizer) -> PreTrainedTokenizerFast:
    _add_specials(core, QWEN_SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _llama3_tokenizer(core: Tokenizer) -> PreTrainedTokenizerFast:
    ids = _add_specials(core, LLAMA3_SPECIALS)
    bos = "<|begin_of_text|>"
    # Llama-3 prepends BOS when encoding plain text (its post-processor); chat templates put it in the text.
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, ids[bos])]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token="<|eot_id|>")  # no pad token
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def generation_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """The family's instruct generation_config.json: sampling defaults and a list of two EOS ids."""
    tid = tokenizer.convert_tokens_to_ids
    if preset.family == "qwen2":  # as Qwen2.5-Instruct's
        eot = tid("<|endoftext|>")
        return GenerationConfig(bos_token_id=eot, pad_token_id=eot, eos_token_id=[tid("<|im_end|>"), eot],
                                do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    return GenerationConfig(bos_token_id=tid("<|begin_of_text|>"),  # as Llama-3-Instruct's
                            eos_token_id=[tid("<|end_of_text|>"), tid("<|eot_id|>")],
                            do_sample=True, temperature=0.6, top_p=0.9)  # fmt: skip


def hf_config(preset: Preset, tokenizer: PreTrainedTokenizerFast):
    """The preset's config.json with this tokenizer's BOS/EOS ids (Qwen: bos <|endoftext|>)."""
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>") if preset.family == "qwen2" else tokenizer.bos_token_id
    return model_config(preset, bos_id=bos, eos_id=tokenizer.eos_token_id)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_model(preset: Preset, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """Random weights created directly in the preset's dtype (a bf16 0.5B never exists in fp32)."""
    config = hf_config(preset, tokenizer)
    cls = Qwen2ForCausalLM if preset.family == "qwen2" else LlamaForCausalLM
    torch.manual_seed(seed)
    with default_dtype(preset.torch_dtype):
        model = cls(config)
    model.generation_config = generation_config(preset, tokenizer)
    return model.eval()


def _patch_tokenizer_config(path: Path, preset: Preset) -> None:
    """Name the class a hub directory names (Qwen: its own; Llama-3: the generic fast tokenizer)."""
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer" if preset.family == "qwen2" else "PreTrainedTokenizerFast"
    cfg["model_max_length"] = preset.max_position_embeddings
    cfg["clean_up_tokenization_spaces"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def write_model_dir(preset: Preset, out: Union[str, os.PathLike], *, seed: int = 0,
                    tokenizer_cache: Optional[os.PathLike] = None) -> Path:  # fmt: skip
    """Write ``preset``'s directory to ``out`` (must not exist) atomically; returns its path."""
    final = Path(out)
    if final.exists():
        raise FileExistsError(f"{str(final)!r} already exists; remove it or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        tokenizer = build_tokenizer(preset, tokenizer_cache)
        model = init_model(preset, tokenizer, seed)
        model.save_pretrained(tmp)
        del model
        tokenizer.save_pretrained(tmp)
        _patch_tokenizer_config(tmp, preset)
        marker = {"preset": asdict(preset), "seed": seed, "format": FORMAT_VERSION, "tokenizer_len": len(tokenizer)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)  # atomic: readers see a complete directory or none
        except OSError as e:  # another process wrote ``out`` meanwhile
            raise FileExistsError(f"{str(final)!r} was written by another process meanwhile") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cache_key(preset: Preset, seed: int) -> str:
    """Hashes the preset, the seed, the transformers version and the tokenizer's content key (which
    covers the corpus text: another Python's library means another tokenizer, so another directory)."""
    import transformers

    payload = {"format": FORMAT_VERSION, "preset": asdict(preset), "seed": seed,
               "transformers": transformers.__version__, "tokenizer": corpus_key(preset.bpe)}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELAXRL_CACHE", "~/.cache/relaxrl")).expanduser() / "real_models"


def prepare_model_dir(name: str, cache_dir: Optional[os.PathLike] = None, seed: int = 0) -> str:
    """``name``'s directory under ``cache_dir`` (built once, then reused); returns its path."""
    preset = get_preset(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{preset.name}-{cache_key(preset, seed)}"
    if (final / MARKER).is_file():
        return str(final)
    try:
        write_model_dir(preset, final, seed=seed)
    except FileExistsError:
        if not (final / MARKER).is_file():  # a complete directory always has the marker
            raise
    return str(final)


def dir_size(path: Union[str, os.PathLike]) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="directory to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = write_model_dir(get_preset(args.preset), args.out, seed=args.seed)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    print(f"built {args.preset} in {path}: size_mb={dir_size(path) / 1e6:.1f} build_s={seconds:.1f} "
          f"peak_rss_gb={peak_gb:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
