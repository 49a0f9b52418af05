"""Real-shaped model directories built offline (relaxrl.models.build): tiny presets only by default.

The 0.5B preset's weights are built only under ``RELAXRL_BIGMODEL=1 pytest -m bigmodel``; its
config and parameter count are checked here on the meta device, without any weights."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from relaxrl.models import bpe, build
from relaxrl.models.loading import load_model, load_tokenizer
from relaxrl.models.presets import QWEN_VOCAB, get_preset, model_config

SENTENCE = "Hello  world,\n\nthe  café's   3 spaces\tand\n  indented code: x = f(12345)\n"
CHAT = [{"role": "user", "content": "What is 2+3?\nAnswer briefly."}, {"role": "assistant", "content": "5"}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-shaped")


@pytest.fixture(scope="module")
def built(cache):
    """Both tiny presets built once (tokenizers come from the ~/.cache/relaxrl cache after the first run)."""
    return {name: build.prepare_model_dir(name, cache) for name in ("qwen-tiny-152k", "llama3-tiny")}


def safetensors_header(path: str) -> dict:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def test_qwen_05b_preset_config_and_parameter_count_without_weights():
    preset = get_preset("qwen2.5-0.5b")
    config = model_config(preset, bos_id=32000, eos_id=32002)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (896, 24, 14)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (2, 4864, 151_936)
    assert config.tie_word_embeddings is True and config.rms_norm_eps == 1e-6
    assert config.rope_parameters["rope_theta"] == 1e6 and config.max_position_embeddings == 32768
    assert config.model_type == "qwen2" and preset.dtype == "bfloat16" and preset.bpe_vocab == 32_000
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):  # shapes only: no memory for the weights
        model = Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's count


def test_presets_share_their_family_vocabulary_and_reject_bad_shapes():
    assert {get_preset(n).vocab_size for n in ("qwen2.5-0.5b", "qwen-mid-152k", "qwen-tiny-152k")} == {QWEN_VOCAB}
    tiny = get_preset("qwen-tiny-152k")
    assert tiny.hidden_size // tiny.num_heads >= 32  # vLLM's CPU attention needs head dim >= 32
    with pytest.raises(ValueError, match="unknown model preset 'qwen-huge'"):
        get_preset("qwen-huge")
    with pytest.raises(ValueError, match="head dim >= 32"):
        type(tiny)(**{**tiny.__dict__, "name": "bad", "num_heads": 8})


def test_bpe_training_is_deterministic_and_the_corpus_sorted_and_cut(tmp_path):
    files = bpe.corpus_files(200_000)
    rel = [p.relative_to(bpe.stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel) and not any("/test/" in f"/{r}" for r in rel)
    sizes = [p.stat().st_size for p in files]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)  # whole files until the budget is reached
    spec = bpe.BPESpec(vocab_size=600, corpus_bytes=200_000)
    texts = bpe.read_texts(files)
    assert bpe.train_bpe(spec, texts).to_str() == bpe.train_bpe(spec, texts).to_str()
    assert bpe.content_key(spec, texts) != bpe.content_key(spec, texts[:-1])


def test_cached_bpe_trains_once_per_content_key(tmp_path, monkeypatch):
    spec = bpe.BPESpec(vocab_size=600, corpus_bytes=100_000)
    first = bpe.cached_bpe(spec, tmp_path)
    assert len([d for d in tmp_path.iterdir() if not d.name.startswith(".")]) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached tokenizer")

    monkeypatch.setattr(bpe, "train_bpe", no_training)
    assert bpe.cached_bpe(spec, tmp_path).to_str() == first.to_str()


@pytest.mark.parametrize("name", ["qwen-tiny-152k", "llama3-tiny"])
def test_tokenizer_reencodes_identically_after_save_and_load(built, name):
    fresh = build.build_tokenizer(get_preset(name))
    loaded = load_tokenizer(built[name])
    ids = loaded(SENTENCE, add_special_tokens=False)["input_ids"]
    assert ids == fresh(SENTENCE, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == SENTENCE  # spaces, tabs and newlines survive
    assert len(ids) < 0.75 * len(SENTENCE)  # a trained BPE, not bytes or characters (40 of 72 here)
    rendered = loaded.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert rendered == fresh.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert loaded.decode(rendered) == loaded.apply_chat_template(CHAT, tokenize=False)


def test_qwen_directory_has_chatml_eos_im_end_and_pad_endoftext(built):
    path = built["qwen-tiny-152k"]
    tok = load_tokenizer(path)
    assert type(tok).__name__ == "Qwen2Tokenizer"  # what a hub Qwen directory loads as
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert len(tok) == get_preset("qwen-tiny-152k").bpe_vocab + 3
    text = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "What is 2+3?\nAnswer briefly.<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # specials are single tokens
    gen = json.loads(open(os.path.join(path, "generation_config.json")).read())
    eot, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id
    assert gen["eos_token_id"] == [im_end, eot] and gen["pad_token_id"] == eot and gen["do_sample"] is True
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["vocab_size"]) == (im_end, eot, QWEN_VOCAB)


def test_llama3_directory_has_no_pad_token_and_two_eos_ids(built):
    path = built["llama3-tiny"]
    tok = load_tokenizer(path)
    assert tok.pad_token is None and tok.pad_token_id is None
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    gen = json.loads(open(os.path.join(path, "generation_config.json")).read())
    two = [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")]
    assert gen["eos_token_id"] == two and len(set(two)) == 2 and "pad_token_id" not in gen
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"][0] == bos  # plain text gets Llama-3's BOS
    rendered = tok.apply_chat_template(CHAT[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert rendered.count(bos) == 1 and rendered[0] == bos  # the template's BOS, not a second one
    assert tok.decode(rendered).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("name", ["qwen-tiny-152k", "llama3-tiny"])
def test_directory_loads_as_a_local_model_in_the_preset_dtype(built, name):
    preset, path = get_preset(name), built[name]
    assert {v["dtype"] for v in safetensors_header(path).values()} == {"F32"}
    model = load_model(path)
    assert model.config.vocab_size == preset.vocab_size and model.config.model_type == preset.family.rstrip("3")
    ids = load_tokenizer(path)(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], preset.vocab_size) and torch.isfinite(logits).all()


def test_model_local_config_accepts_the_directory(built):
    from hydra import compose, initialize_config_module

    from relaxrl.config_check import check_model_dir

    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["run_dir=/tmp/x", "model=local",
                                                       f"model.path={built['qwen-tiny-152k']}"])  # fmt: skip
    check_model_dir(cfg)  # raises naming the problem if the roles could not load it


def test_bf16_preset_weights_are_created_in_bf16():
    preset = get_preset("qwen-tiny-152k")
    bf16 = type(preset)(**{**preset.__dict__, "name": "tiny-bf16", "dtype": "bfloat16"})
    model = build.init_model(bf16, build.build_tokenizer(preset))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the dtype context is left as found
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_write_refuses_an_existing_directory(tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        build.write_model_dir(get_preset("qwen-tiny-152k"), tmp_path)


def test_prepare_model_dir_reuses_a_complete_directory(built, cache):
    first = built["llama3-tiny"]
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    assert build.prepare_model_dir("llama3-tiny", cache) == first
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp
    preset = get_preset("llama3-tiny")
    assert build.cache_key(preset, seed=1) != build.cache_key(preset, seed=0)  # another seed, another directory


@pytest.mark.bigmodel
@pytest.mark.skipif(not os.environ.get("RELAXRL_BIGMODEL"), reason="builds 1 GB of weights: RELAXRL_BIGMODEL=1 pytest -m bigmodel")
def test_qwen_05b_cli_builds_bf16_within_twice_its_weights(tmp_path):
    out = tmp_path / "qwen2.5-0.5b"
    proc = subprocess.run([sys.executable, "-m", "relaxrl.models.build", "--preset", "qwen2.5-0.5b", "--out", str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    line = proc.stdout.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in line.split()[-3:])
    header = safetensors_header(str(out))
    weights = sum(2 * torch.Size(v["shape"]).numel() for v in header.values())
    assert {v["dtype"] for v in header.values()} == {"BF16"} and weights == 2 * 494_032_768
    assert float(figures["peak_rss_gb"]) * 1e9 < 2 * weights, line
    assert len(load_tokenizer(str(out))) == 32_003
