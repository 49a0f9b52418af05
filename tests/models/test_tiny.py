import pytest
import torch

from relaxrl.models.chat import PromptEncoder, render_prompt_ids
from relaxrl.models.loading import load_model, load_tokenizer
from relaxrl.models.tiny import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_is_character_level_and_round_trips(tok):
    ids = tok("12+5=", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "+", "5", "="]
    for text in ["12+5=", "a , b. c?", "x\n\ny  z", "don't (say) \"hi\" {[<>]}"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_special_token_ids(tok):
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<eos>", 1)
    assert tok.convert_ids_to_tokens(tok("é")["input_ids"]) == ["<unk>"]


def test_chat_template_renders_minimal_turns(tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}], tokenize=False
    )
    assert text == "<|user|>3+4=<|assistant|>7<eos>"
    ids = render_prompt_ids(tok, "3+4=")
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert tok.convert_ids_to_tokens(ids) == ["<|user|>", "3", "+", "4", "=", "<|assistant|>"]


def test_prompt_encoder_renders_as_the_template_and_returns_fresh_lists(tok):
    enc = PromptEncoder(tok, max_entries=2)
    first = enc("3+4=")
    assert first == render_prompt_ids(tok, "3+4=")
    first.append(-1)  # a caller changing its list does not change the cached rendering
    assert enc("3+4=") == render_prompt_ids(tok, "3+4=")
    for text in ("1+1=", "2+2=", "3+4="):  # evicted entries are rendered again, the same
        assert enc(text) == render_prompt_ids(tok, text)


def test_render_prompt_ids_without_template_raises(tok):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt_ids(bare, "1+1=")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_is_deterministic_in_seed(tok, arch):
    a, b = build_tiny_model(tok, arch=arch, seed=3), build_tiny_model(tok, arch=arch, seed=3)
    c = build_tiny_model(tok, arch=arch, seed=4)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sa.items())
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert a.config.vocab_size % 8 == 0 and a.config.vocab_size >= len(tok)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied
    assert a.dtype == torch.float32 and a.config.pad_token_id == 0 and a.config.eos_token_id == 1


def test_model_argument_errors(tok):
    with pytest.raises(ValueError, match="hidden_size=64.*num_heads=4"):
        build_tiny_model(tok, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="qwen2"):
        build_tiny_model(tok, arch="gpt9")


def test_saved_model_loads_through_the_real_path(tok, tmp_path):
    model = build_tiny_model(tok, seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path), load_tokenizer(tmp_path)
    ids = render_prompt_ids(loaded_tok, "12+5=")
    assert ids == render_prompt_ids(tok, "12+5=")
    assert loaded_tok.decode(loaded_tok("12+5=")["input_ids"]) == "12+5="
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.dtype == torch.float32 and not loaded.training


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_reloaded_tokenizer_keeps_spaces_and_newlines(tok, tmp_path, arch):
    # transformers picks Qwen2's own tokenizer class for a qwen2 config, which dropped these.
    build_tiny_model(tok, arch=arch).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "calc 9 + 3\nthen  done"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert render_prompt_ids(loaded, text) == render_prompt_ids(tok, text)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not download"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
