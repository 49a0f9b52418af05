"""Agent code written against an OpenAI-style client, trained as it stands.

A user's agent is any object with a ``run(client, task)`` method (``Agent`` below): RelaxRL hands it
an ``openai`` client whose ``base_url`` points at the run's OpenAI-compatible endpoint
(``relaxrl/services/agent_rollout.py``), under a fresh episode id; every chat completion it asks for
is sampled by the current policy and recorded token by token. The agent's return value is the
episode's reward (``None``: the env's verifier scores the last reply). It is named in config by import
path, like the other plug-ins (``relaxrl/envs/plugins.py``)::

    agent.target=my_agent:CalcAgent '+agent.args={tries: 2}'  ray.serve_proxy=HeadOnly

No Ray here; ``check_agent_config`` refuses a config that cannot work before Ray starts.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from relaxrl.envs.base import Task
from relaxrl.envs.plugins import import_modules, load_object

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@runtime_checkable
class Agent(Protocol):
    async def run(self, client: Any, task: Task) -> Optional[float]:
        """Play one episode of ``task`` with ``client`` (``openai.AsyncOpenAI``; ``openai.OpenAI`` for a
        plain ``def run``, which then runs in a thread) and return its reward, or None to have the
        env's verifier score the last reply. Each call must send the chat so far unchanged: the
        previous messages and the reply exactly as returned, then the new messages."""


@dataclass
class AgentConfig:
    """``agent.*``: the user's agent and the endpoint it talks to (off unless ``target`` is set)."""

    target: Optional[str] = None  # "my_agent:CalcAgent" (a class, a factory or an object); None: no agent
    imports: list[str] = field(default_factory=list)  # modules imported first
    args: dict[str, Any] = field(default_factory=dict)  # constructor kwargs of a class or factory target
    timeout_s: float = 120.0  # an episode running longer is cancelled; its group is dropped (agent_timeout)
    max_calls: int = 16  # chat completions per episode; more are refused (HTTP 400)
    num_cpus: float = 0.2  # the agent rollout replica (it runs the agents and tokenises; the policy generates)
    model_name: str = "relaxrl-policy"  # what /v1/models lists; any name a request sends is accepted


def _origin(target: str, obj: Any) -> str:
    return f"agent.target={target!r} ({getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)})"


def make_agent(target: Optional[str], *, imports: Any = (), args: Optional[dict] = None, **_: Any) -> Any:
    """The agent object ``target`` names: a class or factory is called with ``args``; anything else
    (an instance) is used as it is. Checked against ``Agent``."""
    if not target:
        raise ValueError("agent.target is not set: name your agent by import path, e.g. "
                         "agent.target=my_agent:CalcAgent")
    import_modules(list(imports), "agent.imports")
    obj = load_object(target, "agent.target")
    origin = _origin(target, obj)
    if inspect.iscoroutinefunction(obj):  # a bare ``async def run(client, task)``
        if args:
            raise ValueError(f"{origin} is a function: agent.args {sorted(args)} cannot be passed to it")
        return check_agent(_FunctionAgent(obj), origin)
    if inspect.isclass(obj) or (callable(obj) and not hasattr(obj, "run")):
        try:
            obj = obj(**(args or {}))
        except TypeError as e:
            raise TypeError(f"{origin}: building the agent with agent.args {sorted(args or {})} failed: {e}") from e
    elif args:
        raise ValueError(f"{origin} is an object, not a class or factory: agent.args {sorted(args)} cannot be passed")
    return check_agent(obj, origin)


class _FunctionAgent:
    def __init__(self, fn: Any) -> None:
        self.run = fn


def check_agent(agent: Any, origin: str = "") -> Any:
    """``agent`` itself if it has ``run(client, task)``, else an error naming what is wrong."""
    where = origin or type(agent).__qualname__
    run = getattr(agent, "run", None)
    if run is None:
        raise TypeError(f"{where} does not implement Agent (relaxrl.envs.agent): missing method "
                        "async run(client, task) -> float | None")
    try:
        inspect.signature(run).bind("client", "task")
    except TypeError as e:
        raise TypeError(f"{where} does not implement Agent (relaxrl.envs.agent): method run cannot be called "
                        f"as run(client, task): {e}") from None
    except ValueError:  # no signature (a builtin): trust it
        pass
    return agent


def is_async_agent(agent: Any) -> bool:
    """An ``async def run`` gets ``openai.AsyncOpenAI``; a plain one ``openai.OpenAI`` in a thread (a
    blocking call on the replica's event loop would wait on itself: its HTTP calls come back there)."""
    run = agent.run
    return inspect.iscoroutinefunction(run) or inspect.iscoroutinefunction(getattr(run, "__call__", None))


def agent_problems(agent: Any, ray: Any, algorithm_name: str, multi_turn: bool = False) -> list[str]:
    """What in the config keeps the agent endpoint from working (empty: nothing)."""
    out = []
    if ray.serve_proxy == "Disabled":
        out.append("the agent's client reaches the policy through Serve's HTTP proxy: set ray.serve_proxy=HeadOnly "
                   "(EveryNode on a cluster: each node's proxy, on that node's 127.0.0.1)")
    if str(ray.host) not in LOOPBACK:
        out.append(f"ray.host={ray.host!r}: the OpenAI endpoint serves the policy only on the loopback interface; "
                   "keep ray.host=127.0.0.1 with agent.target")
    if algorithm_name == "dagger" or multi_turn:
        out.append("the agent plays single-turn tasks (env.tasks) its own way; a multi-turn env (and "
                   "algorithm=dagger) plays the env's own episodes instead")
    if importlib.util.find_spec("openai") is None:
        out.append("the agent's client is the openai package: pip install -e '.[agent]' (or pip install openai)")
    if agent.timeout_s <= 0 or agent.max_calls < 1:
        out.append(f"agent.timeout_s ({agent.timeout_s}) must be > 0 and agent.max_calls ({agent.max_calls}) >= 1")
    return out


def check_agent_config(cfg: Any, multi_turn: bool = False) -> None:
    """Refuse, before Ray starts, an agent config that cannot work; nothing when ``agent.target`` is unset."""
    agent = cfg.get("agent") if hasattr(cfg, "get") else getattr(cfg, "agent", None)
    if agent is None or not agent.target:
        return
    problems = agent_problems(agent, cfg.ray, cfg.algorithm.name, multi_turn)
    if problems:
        raise ValueError("agent.target=" + repr(agent.target) + ": " + "; ".join(problems))
    make_agent(agent.target, imports=agent.imports, args=dict(agent.args))  # importable here, as in the replica
