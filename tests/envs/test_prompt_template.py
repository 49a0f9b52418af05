"""Prompts for a base model (no chat template): env.prompt_template, and finding a template on disk."""

import json

import pytest

from relaxrl.models.chat import PromptEncoder, has_chat_template, render_prompt_ids
from relaxrl.models.loading import load_tokenizer
from relaxrl.models.tiny import build_tokenizer


@pytest.fixture
def bare_tok():
    tok = build_tokenizer()
    tok.chat_template = None
    return tok


def test_template_renders_a_base_model_prompt(bare_tok):
    ids = render_prompt_ids(bare_tok, "3+4=", "Question: {prompt}\nAnswer:")
    assert bare_tok.decode(ids) == "Question: 3+4=\nAnswer:"
    with pytest.raises(ValueError, match="no chat template; set env.prompt_template"):
        render_prompt_ids(bare_tok, "3+4=")


def test_template_wins_over_the_chat_template_only_when_set():
    tok = build_tokenizer()
    assert tok.decode(render_prompt_ids(tok, "1+1=")) == "<|user|>1+1=<|assistant|>"
    assert tok.decode(render_prompt_ids(tok, "1+1=", "Q {prompt} A")) == "Q 1+1= A"


def test_template_keeps_other_braces_and_needs_the_placeholder(bare_tok):
    assert bare_tok.decode(render_prompt_ids(bare_tok, "x", r"Solve {prompt}; put it in \boxed{}")) == \
        r"Solve x; put it in \boxed{}"
    with pytest.raises(ValueError, match=r"env.prompt_template must contain '\{prompt\}'"):
        PromptEncoder(bare_tok, template="Question: {question}")


def test_prompt_encoder_uses_the_template(bare_tok):
    enc = PromptEncoder(bare_tok, template="<{prompt}>")
    assert enc("ab") == render_prompt_ids(bare_tok, "ab", "<{prompt}>") and bare_tok.decode(enc("ab")) == "<ab>"


def test_has_chat_template_agrees_with_the_loaded_tokenizer(tmp_path):
    tok = build_tokenizer()
    with_template, without = tmp_path / "with", tmp_path / "without"
    tok.save_pretrained(with_template)
    tok.chat_template = None
    tok.save_pretrained(without)
    for d in (with_template, without):
        assert has_chat_template(d) == bool(load_tokenizer(d).chat_template)
    assert has_chat_template(with_template) and not has_chat_template(without)
    # An older save: the template inside tokenizer_config.json.
    config = json.loads((without / "tokenizer_config.json").read_text())
    (without / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    assert has_chat_template(without) and bool(load_tokenizer(without).chat_template)
