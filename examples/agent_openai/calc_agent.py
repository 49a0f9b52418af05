"""A two-turn, tool-using agent written against the ``openai`` client, trained by RelaxRL unchanged.

    PYTHONPATH=examples/agent_openai python -m relaxrl.train +experiment=quickstart \
        agent.target=calc_agent:CalcAgent ray.serve_proxy=HeadOnly trainer.steps=20

Nothing here knows about RelaxRL: ``run`` gets an ``openai.AsyncOpenAI`` client (its ``base_url``
is the run's endpoint for one episode) and a task (``task.prompt`` and ``task.answer``, here the
arithmetic env's ``"8+2="`` and ``"10"``). Turn 1 asks the model; the agent reads a calculator call
``calc(A+B)`` from the reply (or, when the reply has none, calls the tool on the question itself),
runs the calculator tool and sends its result back as the next message; turn 2's reply is the final
answer. The return value is the reward. Every reply is sampled by the policy being trained, and
both turns become one training sample (see docs/custom_tasks.md, "OpenAI endpoint").
"""

from __future__ import annotations

import re
from typing import Any, Optional

_CALL = re.compile(r"calc\((-?\d{1,6})\s*([+\-*])\s*(-?\d{1,6})\)")
_QUESTION = re.compile(r"(-?\d{1,6})\s*([+\-*])\s*(-?\d{1,6})")


def calculator(a: int, op: str, b: int) -> int:
    """The tool."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def tool_call(reply: str, question: str) -> Optional[tuple[int, str, int]]:
    """The calculator call in the reply, else the question's own expression (None: neither has one)."""
    m = _CALL.search(reply) or _QUESTION.search(question)
    return (int(m[1]), m[2], int(m[3])) if m else None


class CalcAgent:
    def __init__(self, model: str = "policy") -> None:
        self.model = model

    async def run(self, client: Any, task: Any) -> float:
        messages = [{"role": "user", "content": task.prompt}]
        first = await client.chat.completions.create(model=self.model, messages=messages)
        reply = first.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": reply})  # the reply exactly as returned
        call = tool_call(reply, task.prompt)
        result = "error" if call is None else str(calculator(*call))
        messages.append({"role": "user", "content": f"={result}"})  # the tool's result, as the next message
        final = await client.chat.completions.create(model=self.model, messages=messages)
        answer = (final.choices[0].message.content or "").strip()
        return 1.0 if answer == task.answer else 0.0
