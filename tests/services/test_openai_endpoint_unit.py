"""The OpenAI endpoint's logic without Ray: token-exact episodes, request checks, the agent plug-in."""

import asyncio
from types import SimpleNamespace

import pytest

from relaxrl.envs.agent import agent_problems, check_agent, check_agent_config, is_async_agent, make_agent
from relaxrl.envs.chat_tokens import ChatFormat
from relaxrl.services.openai_endpoint import (EPISODE_PATH, EndpointError, EpisodeBook, completion_body, copy_chat,
                                              cut_reply, episode_fields, models_body, parse_request)


@pytest.fixture(scope="module")
def tiny():
    from relaxrl.models.tiny import build_tokenizer

    return build_tokenizer()


def reply(book, eid, messages, ids, version, logprob=-0.5, finish="stop"):
    """One call as the agent rollout makes it: context, the sampled ids committed; returns the context."""
    ep = book.get(eid)
    chat = ep.context(messages)
    context = chat.ids
    before = copy_chat(chat)
    text = book.fmt.tokenizer.decode(ids[:-1] if finish == "stop" else ids, skip_special_tokens=True)
    chat.add_action(ids, text, logprobs=[logprob] * len(ids), version=version, finish_reason=finish)
    ep.commit(before, chat)
    return context, text


def test_a_second_call_reuses_the_sampled_ids_and_appends_only_the_new_messages(tiny):
    """The reply holds a token its text does not show (a special token, dropped from the decoded
    content): the next call's context keeps the ids as sampled, where re-rendering the chat's text
    (what a plain OpenAI server does) gives other ids."""
    fmt = ChatFormat(tiny)
    book = EpisodeBook(fmt, max_calls=4)
    book.open("e1")
    first = [{"role": "user", "content": "12+34="}]
    sampled = fmt.encode("calc(12+34") + [tiny.convert_tokens_to_ids("<|user|>")] + fmt.encode(")") + [1]
    ctx1, text = reply(book, "e1", first, sampled, version=3)
    assert text == "calc(12+34)" and ctx1 == fmt.prompt_ids(first)
    second = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "=46"}]
    answer = fmt.action_ids("46")
    ctx2, _ = reply(book, "e1", second, answer, version=4)
    delta = fmt.turn_ids(second[:2], second[2:], stopped=True)
    assert ctx2 == ctx1 + sampled + delta  # the sampled ids, as sampled, then the new message's delta
    out = tiny.apply_chat_template(second, add_generation_prompt=True, tokenize=True)
    rerendered = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert rerendered != ctx2 and len(rerendered) == len(ctx2) - 1  # re-rendering loses the sampled token
    f = episode_fields(book.close("e1").chat)
    assert f["prompt_ids"] == ctx1 and f["prompt_ids"] + f["response_ids"][:-len(answer)] == ctx2
    assert [t for t, m in zip(f["response_ids"], f["loss_mask"]) if m] == sampled + answer  # mask 1: the replies
    assert f["policy_version"] == 3 and f["token_versions"][0] == 3 and f["token_versions"][-1] == 4
    assert [lp for lp, m in zip(f["behaviour_logprobs"], f["loss_mask"]) if not m] == [0.0] * len(delta)
    assert f["response_text"] == "46"


def test_a_retried_call_replaces_the_last_reply(tiny):
    fmt = ChatFormat(tiny)
    book = EpisodeBook(fmt, max_calls=8)
    book.open("e")
    msgs = [{"role": "user", "content": "1+2="}]
    reply(book, "e", msgs, fmt.action_ids("9"), version=0)
    more = msgs + [{"role": "assistant", "content": "9"}, {"role": "user", "content": "=3"}]
    ctx, _ = reply(book, "e", more, fmt.action_ids("4"), version=0)
    ctx_again, _ = reply(book, "e", more, fmt.action_ids("3"), version=1)  # the client retried the call
    ep = book.get("e")
    assert ctx_again == ctx and ep.retries == 1 and ep.calls == 3
    assert ep.chat.messages[-1] == {"role": "assistant", "content": "3"} and len(ep.chat.spans) == 2
    final = more + [{"role": "assistant", "content": "3"}, {"role": "user", "content": "ok"}]
    ep.context(final)  # extends the chat with the retried reply
    with pytest.raises(EndpointError, match=r"messages\[3\]"):
        ep.context(more + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "ok"}])


def test_a_call_that_does_not_extend_the_chat_is_refused_naming_the_message(tiny):
    fmt = ChatFormat(tiny)
    book = EpisodeBook(fmt, max_calls=2)
    book.open("e")
    msgs = [{"role": "user", "content": "1+2="}]
    reply(book, "e", msgs, fmt.action_ids("3"), version=0)
    edited = msgs + [{"role": "assistant", "content": "3 "}, {"role": "user", "content": "sure?"}]
    with pytest.raises(EndpointError, match=r"messages\[1\] does not continue") as e:
        book.get("e").context(edited)
    assert e.value.status == 400
    with pytest.raises(EndpointError, match="messages\\[0\\]"):
        book.get("e").context([{"role": "user", "content": "other"}])
    reply(book, "e", msgs + [{"role": "assistant", "content": "3"}, {"role": "user", "content": "?"}],
          fmt.action_ids("3"), version=0)
    with pytest.raises(EndpointError, match="agent.max_calls=2"):
        book.get("e").context([{"role": "user", "content": "1+2="}])
    book.close("e")
    with pytest.raises(EndpointError, match="no open episode") as e:
        book.get("e")
    assert e.value.status == 404 and e.value.body()["error"]["code"] == "not_found_error"


def test_requests_the_endpoint_cannot_honour_are_refused_by_name():
    ok = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                                  "text": "b"}]}]}
    req = parse_request(ok, temperature=1.0, top_p=1.0)
    assert req.messages == [{"role": "user", "content": "ab"}] and req.max_tokens is None
    assert parse_request(b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 1}',
                         temperature=1.0, top_p=1.0).max_tokens == 3
    bad = [({"tools": [{"type": "function"}]}, "tools: no tool-call parser"),
           ({"stream": True}, "stream"), ({"n": 2}, "n=2"), ({"stop": ["\n"]}, "stop"),
           ({"temperature": 0.2}, "rollout.temperature=1.0"), ({"max_tokens": 0}, "max_tokens"),
           ({"messages": []}, "non-empty"), ({"messages": [{"role": "robot", "content": "x"}]}, "role must be"),
           ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "no prefill"),
           ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                          {"role": "user", "content": "x"}]}, "tool_calls")]
    for change, message in bad:
        with pytest.raises(EndpointError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
            parse_request({**ok, **change}, temperature=1.0, top_p=1.0)
        assert e.value.status == 400
    with pytest.raises(EndpointError, match="not JSON"):
        parse_request(b"{", temperature=1.0, top_p=1.0)
    # the openai client's own assistant message (a dumped pydantic model) compares equal to the record
    dumped = {"role": "assistant", "content": "y", "refusal": None, "tool_calls": None, "annotations": None}
    assert parse_request({"messages": [dumped, {"role": "user", "content": "x"}]}, temperature=1.0,
                         top_p=1.0).messages[0] == {"role": "assistant", "content": "y"}


def test_the_route_the_openai_client_calls_and_the_completion_body():
    m = EPISODE_PATH.search("/relaxrl/ab12cd34/g3-1-0f0f/v1/chat/completions")
    assert m["episode"] == "g3-1-0f0f" and m["what"] == "chat/completions"
    assert EPISODE_PATH.search("/relaxrl/ab12cd34/g3-1-0f0f/v1/completions") is None
    assert EPISODE_PATH.search("/relaxrl/ab12cd34/g3-1-0f0f/v1/models")["what"] == "models"
    from openai.types import Model

    assert Model.model_validate(models_body("policy")["data"][0]).id == "policy"  # client.models.list()
    from openai.types.chat import ChatCompletion

    body = completion_body("g3-1-0f0f", 2, "policy", "46", "stop", [5, 6, 7], [8, 1], version=3)
    parsed = ChatCompletion.model_validate(body)  # what the openai client builds from the response
    assert parsed.choices[0].message.content == "46" and parsed.choices[0].finish_reason == "stop"
    assert parsed.usage.prompt_tokens == 3 and parsed.usage.completion_tokens == 2
    assert parsed.model_extra["relaxrl"]["completion_token_ids"] == [8, 1]
    assert cut_reply([4, 5, 1], [-1.0, -2.0, -3.0], "stop", 2) == ([4, 5], [-1.0, -2.0], "length")
    assert cut_reply([4, 5, 1], [-1.0, -2.0, -3.0], "stop", 3) == ([4, 5, 1], [-1.0, -2.0, -3.0], "stop")


class GoodAgent:
    def __init__(self, bonus: float = 0.0) -> None:
        self.bonus = bonus

    async def run(self, client, task):
        return 1.0 + self.bonus


class SyncAgent:
    def run(self, client, task):
        return None


async def function_agent(client, task):
    return 0.5


def test_agents_are_loaded_by_import_path_and_checked():
    mod = __name__
    agent = make_agent(f"{mod}:GoodAgent", args={"bonus": 1.0})
    assert agent.bonus == 1.0 and is_async_agent(agent) and asyncio.run(agent.run(None, None)) == 2.0
    assert not is_async_agent(make_agent(f"{mod}:SyncAgent"))
    assert asyncio.run(make_agent(f"{mod}:function_agent").run(None, None)) == 0.5
    with pytest.raises(TypeError, match=r"does not implement Agent .*missing method async run\(client, task\)"):
        check_agent(object(), "agent.target='x:y'")
    with pytest.raises(TypeError, match="cannot be called as run"):
        check_agent(SimpleNamespace(run=lambda client: None))
    with pytest.raises(TypeError, match="agent.args"):
        make_agent(f"{mod}:GoodAgent", args={"nope": 1})
    with pytest.raises(ImportError, match="agent.target"):
        make_agent("no_such_module_here:Agent")
    with pytest.raises(ValueError, match="agent.target is not set"):
        make_agent(None)


def test_an_agent_config_that_cannot_work_is_refused_before_ray():
    agent = SimpleNamespace(target=f"{__name__}:GoodAgent", imports=[], args={}, timeout_s=10.0, max_calls=4)
    ray_ok = SimpleNamespace(serve_proxy="HeadOnly", host="127.0.0.1")
    assert agent_problems(agent, ray_ok, "grpo") == []
    problems = agent_problems(agent, SimpleNamespace(serve_proxy="Disabled", host="0.0.0.0"), "grpo", True)
    assert len(problems) == 3
    assert "ray.serve_proxy=HeadOnly" in problems[0] and "ray.host='0.0.0.0'" in problems[1]
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"agent": vars(agent), "ray": {"serve_proxy": "Disabled", "host": "127.0.0.1"},
                            "algorithm": {"name": "grpo"}})
    with pytest.raises(ValueError, match="ray.serve_proxy=HeadOnly"):
        check_agent_config(cfg)
    cfg.agent.target = None
    check_agent_config(cfg)  # no agent: nothing to check


def test_the_example_agent_plays_two_turns_with_the_tool():
    from examples.agent_openai.calc_agent import CalcAgent, tool_call

    assert tool_call("calc(12+30)", "3+4=") == (12, "+", 30) and tool_call("7", "3+4=") == (3, "+", 4)
    seen = []

    async def create(model, messages):
        seen.append([dict(m) for m in messages])
        content = "calc(3+4)" if len(seen) == 1 else " 7"
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=content))])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    assert asyncio.run(CalcAgent().run(client, SimpleNamespace(prompt="3+4=", answer="7"))) == 1.0
    assert seen[1] == [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "calc(3+4)"},
                       {"role": "user", "content": "=7"}]


def test_an_episode_becomes_a_sample_with_the_agents_reward_or_a_counted_error(tiny):
    from relaxrl.sample import Sample
    from relaxrl.services.openai_endpoint import episode_sample

    fmt = ChatFormat(tiny)
    book = EpisodeBook(fmt, max_calls=4)
    book.open("g0-1-ab")
    reply(book, "g0-1-ab", [{"role": "user", "content": "1+2="}], fmt.action_ids("3"), version=2)
    chat = book.close("g0-1-ab").chat
    base = Sample(uid="g0/1", group_id="g0", index=1, prompt_ids=[9, 9], answer="3")
    s = episode_sample(base, chat, 1, 1)
    assert s.reward == 1.0 and s.prompt_ids == chat.prompt_ids and s.policy_version == 2
    assert s.reward_info == {"agent_calls": 1.0} and s.uid == "g0/1" and s.answer == "3"
    left = episode_sample(base, chat, 1, None)  # None: the env's verifier scores the last reply
    assert left.reward is None and "error" not in left.reward_info and left.response_text == "3"
    for returned, chat_, error, reason in [("good", chat, None, "agent_error"), (1.0, None, None, "agent_no_calls"),
                                           (None, chat, {"error": "agent_timeout", "detail": "x"}, "agent_timeout")]:
        bad = episode_sample(base, chat_, 1, returned, error)
        assert bad.reward is None and bad.reward_info["error"] == reason  # the queue drops its group, counted
    assert base.reward is None and base.reward_info == {}  # the template sample is not changed
