"""Token-exact chat assembly (relaxrl.envs.chat_tokens): sampled ids are kept, never re-rendered."""

import pytest

from relaxrl.envs.chat_tokens import ChatFormat, ChatTokens
from relaxrl.models.tiny import build_tokenizer as tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def qwen():
    """The real-shaped ChatML BPE tokenizer (a cached local BPE, as tests/models/test_build.py builds)."""
    from relaxrl.models.build import build_tokenizer
    from relaxrl.models.presets import get_preset

    return build_tokenizer(get_preset("qwen-tiny-152k"))


@pytest.fixture(scope="module")
def llama():
    from relaxrl.models.build import build_tokenizer
    from relaxrl.models.presets import get_preset

    return build_tokenizer(get_preset("llama3-tiny"))


def rerendered(tok, chat: ChatTokens) -> list[int]:
    """What re-rendering the chat's text would give (the old way)."""
    out = tok.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def play(fmt: ChatFormat, actions, observations, first="12+34"):
    chat = ChatTokens.start(fmt, [{"role": "user", "content": first}])
    for k, (ids, text) in enumerate(actions):
        chat.add_action(ids, text, logprobs=[-0.5] * len(ids), version=7 + k)
        if k < len(observations):
            chat.add_messages([{"role": "user", "content": observations[k]}])
    return chat


@pytest.mark.parametrize("name", ["tiny", "qwen"])
def test_canonical_actions_give_the_template_rendering(name, request):
    tok = request.getfixturevalue(name)
    fmt = ChatFormat(tok)
    actions = [(fmt.action_ids(t), t) for t in ("calc(12+34)", "answer(46)")]
    chat = play(fmt, actions, ["=46"])
    # Sampled ids that are the canonical tokenisation: the delta assembly is the template's rendering.
    full = tok.apply_chat_template(chat.messages, add_generation_prompt=False, tokenize=False)
    assert tok.decode(chat.ids) == full.removesuffix("\n")  # ChatML's "\n" after the last <|im_end|>
    # Loss mask 1 exactly on the two actions (end-of-turn included), versions per action.
    (a0, b0), (a1, b1) = chat.spans
    assert chat.response_ids[a0:b0] == actions[0][0] and chat.response_ids[a1:b1] == actions[1][0]
    assert [i for i, m in enumerate(chat.loss_mask) if m] == list(range(a0, b0)) + list(range(a1, b1))
    assert chat.token_versions[a1:b1] == [8] * (b1 - a1) and set(chat.token_versions[b0:a1]) == {7}
    assert chat.logprobs[b0:a1] == [0.0] * (a1 - b0)


def test_chatml_keeps_a_non_canonical_sampled_split(qwen):
    """A policy may sample 'answer(46)' in pieces the BPE would merge: re-rendering merges them."""
    fmt = ChatFormat(qwen)
    text = "answer(4646)"
    split = [i for ch in text for i in fmt.encode(ch)] + [fmt.end_of_turn_id]  # one token per character
    assert split != fmt.action_ids(text)  # the BPE merges some of these characters
    chat = play(fmt, [(fmt.action_ids("calc(12+34)"), "calc(12+34)"), (split, text)], ["=46"])
    a, b = chat.spans[1]
    assert chat.response_ids[a:b] == split  # trained ids are the sampled ids
    assert chat.ids[:len(chat.prompt_ids) + a] == rerendered(qwen, ChatTokens.start(fmt, chat.messages[:3]))
    assert rerendered(qwen, chat)[:len(chat.ids)] != chat.ids  # the old re-rendering would train other ids


def test_template_that_strips_whitespace_keeps_sampled_ids(llama):
    """Llama-3's template trims content: the sampled trailing spaces survive here, not in a re-render."""
    fmt = ChatFormat(llama)
    text = "calc(12+34)  "
    sampled = fmt.encode(text) + [fmt.end_of_turn_id]
    chat = play(fmt, [(sampled, text)], ["=46"])
    a, b = chat.spans[0]
    assert chat.response_ids[a:b] == sampled
    obs = llama.decode(chat.response_ids[b:])
    assert obs == "<|start_header_id|>user<|end_header_id|>\n\n=46<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert rerendered(llama, chat) != chat.ids


def test_cut_action_gets_the_templates_turn_close_unmasked(qwen):
    fmt = ChatFormat(qwen)
    cut = fmt.encode("calc(12+")  # finish_reason "length": no end-of-turn sampled
    chat = ChatTokens.start(fmt, [{"role": "user", "content": "12+34"}])
    chat.add_action(cut, "calc(12+", logprobs=[-1.0] * len(cut), version=0, finish_reason="length")
    added = chat.add_messages([{"role": "user", "content": "invalid"}])
    assert qwen.decode(added).startswith("<|im_end|>\n<|im_start|>user\ninvalid")
    assert chat.loss_mask[-len(added):] == [0] * len(added)


def test_teacher_action_is_unmasked_and_versions_fill_from_the_first_student_turn(tiny):
    fmt = ChatFormat(tiny)
    chat = ChatTokens.start(fmt, [{"role": "user", "content": "1+2"}])
    chat.add_action(fmt.action_ids("calc(1+2)"), "calc(1+2)", trained=False)  # the teacher acted
    chat.add_messages([{"role": "user", "content": "=3"}])
    ids = fmt.action_ids("answer(3)")
    chat.add_action(ids, "answer(3)", logprobs=[-0.1] * len(ids), version=5)
    a, b = chat.spans[1]
    assert sum(chat.loss_mask) == b - a and chat.loss_mask[a:b] == [1] * (b - a)
    assert chat.token_versions[:a] == [-1] * a and chat.filled_versions() == [5] * b


def test_prompt_template_for_a_tokenizer_without_chat_template(qwen):
    import copy

    base = copy.deepcopy(qwen)
    base.chat_template = None
    with pytest.raises(ValueError, match="prompt_template"):
        ChatFormat(base)
    fmt = ChatFormat(base, "Question: {prompt}\nAnswer:")
    chat = ChatTokens.start(fmt, [{"role": "user", "content": "12+34"}])
    chat.add_action(fmt.action_ids(" calc(12+34)"), " calc(12+34)", logprobs=None, version=1)
    chat.add_messages([{"role": "user", "content": "=46"}])
    assert base.decode(chat.ids) == "Question: 12+34\nAnswer: calc(12+34)<|im_end|>\nQuestion: =46\nAnswer:"


def test_template_rewriting_history_is_refused(tiny):
    import copy

    tok = copy.deepcopy(tiny)
    # Renders only the last two messages: the history's rendering is no prefix of the longer chat's.
    tok.chat_template = ("{% for m in messages[-2:] %}<|user|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fmt = ChatFormat(tok)
    chat = ChatTokens.start(fmt, [{"role": "user", "content": "1+2"}])
    chat.add_action(fmt.action_ids("x"), "x", version=0)
    with pytest.raises(ValueError, match="renders the history differently"):
        chat.add_messages([{"role": "user", "content": "=3"}])
    with pytest.raises(ValueError, match="two actions in a row"):
        chat.add_action([3], "y")
