"""The OpenAI-compatible chat endpoint's logic (no Ray, no HTTP): a request's messages in, the
episode's token-exact context out, the sampled reply recorded, a ``chat.completion`` body back.

An agent's conversation is one episode, one growing token sequence (``relaxrl.envs.chat_tokens``):
its first call's messages are rendered once; each reply is kept as the exact ids the policy sampled
(with their behaviour log-probs and weight version); a later call must send the chat so far
unchanged (the earlier messages, and each reply as it was returned) and only its new messages are
tokenised, as the chat template's delta. Re-rendering the whole chat at each call would re-tokenise
the decoded replies: a merge across the turn boundary or a template that trims whitespace gives
ids the policy never sampled, and the trainer would then train on them.

A call that repeats the last call's messages is that call retried (the client's own retry after a
timeout, say): its reply replaces the earlier one. Any other call that does not extend the chat
(history rewritten, a reply edited, a second branch) is refused with HTTP 400 naming the first
message that differs: its tokens could not be the one sequence the trainer sees.

The Serve side (routing, generation by the policy, the agent runs) is
``relaxrl/services/agent_rollout.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from relaxrl.envs.chat_tokens import ChatFormat, ChatTokens
from relaxrl.sample import Sample

# <prefix>/<episode id>/v1/chat/completions (the openai client appends /chat/completions to its base_url).
EPISODE_PATH = re.compile(r"/(?P<episode>[A-Za-z0-9_.\-]{1,128})/v1/(?P<what>chat/completions|models)/?$")
MAX_BODY_BYTES = 4 << 20
ROLES = ("system", "developer", "user", "assistant", "tool")

# Request keys this endpoint cannot honour: refused by name rather than silently ignored.
UNSUPPORTED = {
    "tools": "no tool-call parser: have the agent read the tool call from the reply's text and send the tool's "
             "result as the next message",
    "tool_choice": "no tool-call parser (see tools)",
    "functions": "no tool-call parser (see tools)",
    "function_call": "no tool-call parser (see tools)",
    "stream": "streaming is not supported",
    "stop": "stop sequences are not supported (the policy stops at its end-of-turn token or rollout.max_new_tokens)",
    "response_format": "constrained decoding is not supported",
    "logit_bias": "it would change the distribution the behaviour log-probs describe",
}


class EndpointError(Exception):
    """A refused request: an HTTP status and OpenAI's error body (the openai client raises it as
    ``BadRequestError``, ``NotFoundError``... with this message)."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.code, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    max_tokens: Optional[int]  # None: rollout.max_new_tokens
    model: str


def _content(value: Any, where: str, role: str) -> str:
    if value is None and role == "assistant":
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise EndpointError(400, f"{where}.content must be a string or a list of text parts, got {value!r:.80}",
                        param=f"{where}.content")


def normalize_message(message: Any, where: str) -> dict:
    """A message as the episode records and compares it: role, content (text), name, tool_call_id.
    Fields a reply never has here (tool_calls, function_call, audio) are refused when set."""
    if not isinstance(message, dict):
        raise EndpointError(400, f"{where} must be an object with role and content", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise EndpointError(400, f"{where}.role must be one of {list(ROLES)}, got {role!r}", param=f"{where}.role")
    for key in ("tool_calls", "function_call", "audio"):
        if message.get(key):
            raise EndpointError(400, f"{where}.{key}: this endpoint never returns {key} (no tool-call parser), so "
                                "no reply of this episode has them", param=f"{where}.{key}")
    out = {"role": role, "content": _content(message.get("content"), where, role)}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = str(message[key])
    return out


def parse_request(body: Any, *, temperature: float, top_p: float) -> ChatRequest:
    """A ``/v1/chat/completions`` body, checked. Sampling is the run's (``rollout.temperature`` and
    ``top_p``: the trainer's log-probs are taken at that temperature): a request asking for another
    is refused, as are n > 1 and the keys in ``UNSUPPORTED``."""
    if isinstance(body, (bytes, bytearray, str)):
        if len(body) > MAX_BODY_BYTES:
            raise EndpointError(413, f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
        try:
            body = json.loads(body)
        except ValueError as e:
            raise EndpointError(400, f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise EndpointError(400, "request body must be a JSON object")
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, False, [], {}):
            raise EndpointError(400, f"{key}: {why}", param=key)
    if body.get("n", 1) != 1:
        raise EndpointError(400, f"n={body['n']}: one completion per call (an episode is one conversation)", param="n")
    for key, run_value, setting in (("temperature", temperature, "rollout.temperature"),
                                    ("top_p", top_p, "rollout.top_p")):
        asked = body.get(key)
        if asked is not None and abs(float(asked) - run_value) > 1e-6:
            raise EndpointError(400, f"{key}={asked}: the policy samples at the run's {setting}={run_value} (the "
                                "trainer's log-probs are taken there); drop it from the request or set "
                                f"{setting}", param=key)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EndpointError(400, "messages must be a non-empty list", param="messages")
    msgs = [normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    if msgs[-1]["role"] == "assistant":
        raise EndpointError(400, "the last message is the assistant's: the reply is the policy's to sample (no "
                            "prefill)", param=f"messages[{len(msgs) - 1}]")
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    if cap is not None and (not isinstance(cap, int) or cap < 1):
        raise EndpointError(400, f"max_tokens must be a positive integer, got {cap!r}", param="max_tokens")
    return ChatRequest(msgs, cap, str(body.get("model") or ""))


def copy_chat(chat: ChatTokens) -> ChatTokens:
    """An independent copy (the format is shared): a call works on one and commits it once sampled."""
    return dataclasses.replace(
        chat, messages=[dict(m) for m in chat.messages], prompt_ids=list(chat.prompt_ids),
        response_ids=list(chat.response_ids), loss_mask=list(chat.loss_mask), logprobs=list(chat.logprobs),
        token_versions=list(chat.token_versions), spans=list(chat.spans))


def _first_difference(a: Sequence[dict], b: Sequence[dict]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Episode:
    """One agent conversation: the chat so far (``chat``) and the one before its last reply
    (``before_last``: a retry of the last call starts again from it)."""

    def __init__(self, episode_id: str, fmt: ChatFormat, max_calls: int) -> None:
        self.id, self.fmt, self.max_calls = episode_id, fmt, max_calls
        self.chat: Optional[ChatTokens] = None
        self.before_last: Optional[ChatTokens] = None
        self.calls = 0  # completions answered (a retried call counts again)
        self.retries = 0
        self.request: Any = None  # what the agent rollout generates its calls for (seed, weights needed)
        self.lock = asyncio.Lock()  # an episode's calls run one at a time: each extends the last

    def context(self, messages: list[dict]) -> ChatTokens:
        """The chat to sample the reply to ``messages`` from (a copy: ``commit`` it once sampled)."""
        if self.calls >= self.max_calls:
            raise EndpointError(400, f"episode {self.id}: more than agent.max_calls={self.max_calls} completions")
        try:
            if self.chat is None:
                return ChatTokens.start(self.fmt, messages)
            prev = self.chat.messages
            if len(messages) > len(prev) and messages[:len(prev)] == prev:
                cand = copy_chat(self.chat)
                cand.add_messages(messages[len(prev):])
                return cand
        except ValueError as e:  # the template cannot render these messages as a delta of the chat
            raise EndpointError(400, f"episode {self.id}: {e}") from None
        if self.before_last is not None and messages == self.before_last.messages:
            self.retries += 1
            return copy_chat(self.before_last)
        i = _first_difference(messages, prev)
        seen = prev[i] if i < len(prev) else "(nothing: the chat so far ends there)"
        got = messages[i] if i < len(messages) else "(nothing: the request ends there)"
        raise EndpointError(400, f"episode {self.id}: messages[{i}] does not continue the episode's chat (it has "
                            f"{seen!r:.120}, the request {got!r:.120}); each call must send the earlier messages "
                            "and replies unchanged, then its new messages", param=f"messages[{i}]")

    def commit(self, before: ChatTokens, after: ChatTokens) -> None:
        """``after`` (``before`` plus the sampled reply) becomes the chat."""
        self.before_last, self.chat = before, after
        self.calls += 1


class EpisodeBook:
    """The open episodes of one endpoint replica, by id. Only episodes opened by the agent rollout
    exist: a call to any other id is a 404."""

    def __init__(self, fmt: ChatFormat, max_calls: int) -> None:
        self.fmt, self.max_calls = fmt, max_calls
        self._open: dict[str, Episode] = {}

    def open(self, episode_id: str) -> Episode:
        if episode_id in self._open:
            raise ValueError(f"episode {episode_id} is already open")
        self._open[episode_id] = ep = Episode(episode_id, self.fmt, self.max_calls)
        return ep

    def get(self, episode_id: str) -> Episode:
        try:
            return self._open[episode_id]
        except KeyError:
            raise EndpointError(404, f"no open episode {episode_id!r} (ended, or never opened by this run)",
                                code="not_found_error") from None

    def close(self, episode_id: str) -> Episode:
        return self._open.pop(episode_id)

    def __len__(self) -> int:
        return len(self._open)


def cut_reply(ids: Sequence[int], logprobs: Sequence[float], finish_reason: str,
              max_tokens: Optional[int]) -> tuple[list[int], list[float], str]:
    """The reply capped at a request's ``max_tokens``: its first tokens are a sample of the policy
    capped there, with the same log-probs."""
    ids, logprobs = list(ids), list(logprobs)
    if max_tokens is not None and len(ids) > max_tokens:
        return ids[:max_tokens], logprobs[:max_tokens], "length"
    return ids, logprobs, finish_reason


def completion_body(episode_id: str, call: int, model: str, text: str, finish_reason: str,
                    context_ids: Sequence[int], reply_ids: Sequence[int], version: int) -> dict:
    """OpenAI's ``chat.completion`` object; ``relaxrl`` (ignored by clients that do not read it)
    carries the exact ids and weight version the trainer will see for this call."""
    return {
        "id": f"chatcmpl-{episode_id}-{call}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": len(context_ids), "completion_tokens": len(reply_ids),
                  "total_tokens": len(context_ids) + len(reply_ids)},
        "relaxrl": {"episode_id": episode_id, "call": call, "policy_version": version,
                    "prompt_token_ids": list(context_ids), "completion_token_ids": list(reply_ids)},
    }


def models_body(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "relaxrl"}]}


def episode_fields(chat: ChatTokens) -> dict:
    """The training sample's token fields of a finished episode: prompt = the first call's prompt,
    response = every later id (replies at loss mask 1, the messages between them at 0), behaviour
    log-probs, and per token the weight version that sampled it. ``policy_version`` is the oldest
    reply's, which the staleness bound counts."""
    versions = chat.filled_versions()
    sampled = [v for v, m in zip(versions, chat.loss_mask) if m]
    if not sampled:
        raise ValueError("an episode without a sampled reply has nothing to train")
    return {
        "prompt_ids": list(chat.prompt_ids),
        "response_ids": list(chat.response_ids),
        "loss_mask": list(chat.loss_mask),
        "behaviour_logprobs": list(chat.logprobs),
        "token_versions": versions,
        "policy_version": min(sampled),
        "finish_reason": chat.finish_reason,
        "response_text": chat.messages[-1]["content"],  # the last reply: what the env's verifier scores
    }


def episode_sample(sample: Sample, chat: Optional[ChatTokens], calls: int, returned: Any,
                   error: Optional[dict] = None) -> Sample:
    """``sample`` (its uid, group, task fields) completed with the finished episode: its tokens, and
    the reward ``run`` returned (None: left for the env's verifier). An agent that failed
    (``error``), asked for no completion or returned something other than a number or None leaves
    the reward None with ``reward_info["error"]``: the queue drops the group under that reason."""
    if error is None and chat is None:
        error = {"error": "agent_no_calls", "detail": "the agent asked for no completion"}
    reward = None
    if error is None and returned is not None:
        try:
            reward = float(returned)
        except (TypeError, ValueError):
            error = {"error": "agent_error", "detail": f"run() returned {returned!r:.80}, not a number or None"}
    out = sample.replace(**episode_fields(chat)) if chat is not None else sample.replace()
    out.reward_info = {"agent_calls": float(calls), **(error or {})}
    out.reward = None if error else reward
    return out
