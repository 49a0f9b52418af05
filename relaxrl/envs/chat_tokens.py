"""Token-exact turn assembly of a chat: what the policy sampled stays exactly as it was sampled.

A multi-turn episode (and an agent's conversation through the OpenAI-compatible endpoint) is one
growing token sequence, never re-rendered:

* the first prompt is rendered **once** (the chat template with the assistant generation prompt,
  or ``env.prompt_template`` for a tokenizer without one);
* each action appends its **sampled ids** (end-of-turn token included when it stopped) with loss
  mask 1, its behaviour log-probs and the weight version that sampled it;
* the messages that follow (observation, tool result) and the next generation prompt are appended
  as the **delta** of the template's text rendering (``render(history + new)`` minus
  ``render(history)``), tokenised once, with loss mask 0.

Re-rendering the whole chat after each turn would re-tokenise the decoded actions: a BPE merge
across a turn boundary, a template that strips whitespace or think content, or a token sampled in
a non-canonical split all give ids the policy never produced. Here those ids never come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

# Stands in for the last assistant turn's content when rendering the delta: only the text the
# template writes after that turn is used, so its content (which a template may rewrite) is moot.
_SENTINEL = "\u2063RELAXRL_ACTION\u2063"


def _ids(out: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding (a Mapping); older versions a plain list of ids.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    ids = out.tolist() if hasattr(out, "tolist") else list(out)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


class ChatFormat:
    """How a tokenizer turns chat messages into ids: its chat template, or a plain-text template.

    ``prompt_template`` (``env.prompt_template``, e.g. ``"Question: {prompt}\\nAnswer:"``) is used
    when given, for a base model's tokenizer without a chat template: the first user message fills
    it (with the tokenizer's own special tokens, e.g. BOS, as single-turn prompts get), and every
    later message fills it again after a newline, without special tokens.
    """

    def __init__(self, tokenizer: Any, prompt_template: Optional[str] = None) -> None:
        from relaxrl.models.chat import NO_TEMPLATE_FIX, check_prompt_template

        self.tokenizer, self.template = tokenizer, prompt_template
        if prompt_template is not None:
            check_prompt_template(prompt_template)
        elif not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; {NO_TEMPLATE_FIX}")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id: an action needs an "
                             "end-of-turn token")
        self.end_of_turn_id = int(eos)

    def _text(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                                 tokenize=False)
        return out if isinstance(out, str) else out[0]

    def encode(self, text: str) -> list[int]:
        """``text`` tokenised as it stands: no BOS or other special tokens added."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The first prompt: ``messages`` (ending with a user turn) and the generation prompt."""
        if not messages or messages[-1].get("role") == "assistant":
            raise ValueError("a chat's first prompt needs at least one message, the last not the assistant's")
        if self.template is not None:
            from relaxrl.models.chat import PLACEHOLDER

            first = self.template.replace(PLACEHOLDER, messages[0]["content"])
            rest = "".join(self._plain(m) for m in messages[1:])
            return [int(i) for i in self.tokenizer(first + rest)["input_ids"]]
        return _ids(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))

    def _plain(self, message: dict) -> str:
        from relaxrl.models.chat import PLACEHOLDER

        return "\n" + self.template.replace(PLACEHOLDER, message["content"])

    def turn_ids(self, history: Sequence[dict], new_messages: Sequence[dict], stopped: bool,
                 last_token: Optional[int] = None) -> list[int]:
        """The ids that follow an action: the template's close of the assistant turn (less the
        end-of-turn token the policy sampled itself when ``stopped``), ``new_messages`` and the next
        generation prompt, tokenised once.

        ``history`` is the chat so far as text, ending with the assistant turn just sampled (its
        content is not used). Raises when the template's rendering of the history is not a prefix
        of its rendering with the new messages: such a template rewrites history, and no delta of it
        is the chat the policy would see."""
        if not new_messages:
            raise ValueError("turn_ids needs at least one new message")
        if not history or history[-1].get("role") != "assistant":
            raise ValueError("new messages must follow an assistant turn (the action just sampled)")
        if self.template is not None:  # plain text: nothing closes a turn but the sampled EOS
            return self.encode("".join(self._plain(m) for m in new_messages))
        hist = [dict(m) for m in history]
        hist[-1]["content"] = _SENTINEL
        before = self._text(hist, generation_prompt=False)
        after = self._text(hist + [dict(m) for m in new_messages], generation_prompt=True)
        if not after.startswith(before):
            at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
            raise ValueError(
                "the chat template renders the history differently once new messages follow (first difference "
                f"at character {at}: {before[at:at + 40]!r} vs {after[at:at + 40]!r}); token-exact multi-turn "
                "chats need a template whose rendering of a chat is a prefix of its rendering with more messages"
            )
        close = before[before.rindex(_SENTINEL) + len(_SENTINEL):]
        if stopped:  # the policy sampled the end-of-turn token: do not write it a second time
            tok = self.end_of_turn_id if last_token is None else last_token
            eot = self.tokenizer.decode([tok], skip_special_tokens=False)
            if eot and close.startswith(eot):
                close = close[len(eot):]
        return self.encode(close + after[len(before):])

    def action_ids(self, text: str) -> list[int]:
        """An action given as text (the programmatic expert's label): its tokens and the end of turn."""
        return self.encode(text) + [self.end_of_turn_id]


@dataclass
class ChatTokens:
    """One chat as the exact ids the policy saw (prompt) and sampled or was shown (response).

    Per response token: ``loss_mask`` (1 on sampled action tokens, 0 on env/tool/template tokens
    and on actions not sampled by the policy), ``logprobs`` (behaviour log-probs, 0 off the
    policy's tokens) and ``token_versions`` (the weight version that sampled the token; an
    observation carries the version of the action before it, a teacher action the last student
    version or ``-1``). ``messages`` is the same chat as text, for the template's deltas."""

    fmt: ChatFormat
    messages: list[dict]
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each action in response_ids
    finish_reason: str = ""  # of the last action

    @classmethod
    def start(cls, fmt: ChatFormat, messages: Sequence[dict]) -> "ChatTokens":
        msgs = [dict(m) for m in messages]
        return cls(fmt, msgs, fmt.prompt_ids(msgs))

    @property
    def ids(self) -> list[int]:
        """Everything so far: the context the next action is sampled from."""
        return self.prompt_ids + self.response_ids

    @property
    def awaiting_action(self) -> bool:
        return self.messages[-1]["role"] != "assistant"

    def _version(self) -> int:
        return self.token_versions[-1] if self.token_versions else -1

    def filled_versions(self) -> list[int]:
        """``token_versions`` with the tokens before the first sampled action (teacher turns and
        their observations, ``-1``) given that action's version: the staleness bound counts the
        policy's tokens, and no older weights made these. All ``-1`` when the policy never acted."""
        first = next((v for v in self.token_versions if v >= 0), -1)
        return [first if v < 0 else v for v in self.token_versions]

    def add_action(self, ids: Sequence[int], text: str, *, logprobs: Optional[Sequence[float]] = None,
                   version: int = -1, finish_reason: str = "stop", trained: bool = True) -> None:
        """Append an action's ids exactly as sampled (``trained``: loss mask 1, with its log-probs)
        or as given (a teacher's action: mask 0). ``text`` is its content as the chat records it."""
        if not self.awaiting_action:
            raise ValueError("two actions in a row: add the observation (add_messages) before the next action")
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("an action needs at least one token")
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} action tokens")
        start = len(self.response_ids)
        self.response_ids += ids
        self.loss_mask += [1 if trained else 0] * len(ids)
        self.logprobs += [float(x) for x in logprobs] if (trained and logprobs is not None) else [0.0] * len(ids)
        v = version if version >= 0 else self._version()
        self.token_versions += [v] * len(ids)
        self.spans.append((start, len(self.response_ids)))
        self.finish_reason = finish_reason
        self.messages.append({"role": "assistant", "content": text})

    def add_messages(self, new_messages: Sequence[dict]) -> list[int]:
        """Append the messages after the last action and the next generation prompt (loss mask 0);
        returns the ids appended."""
        last = self.response_ids[-1] if self.response_ids else None
        ids = self.fmt.turn_ids(self.messages, new_messages, stopped=self.finish_reason == "stop", last_token=last)
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.token_versions += [self._version()] * len(ids)
        self.messages += [dict(m) for m in new_messages]
        return ids
