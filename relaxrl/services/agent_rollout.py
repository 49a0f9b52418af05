"""Agent rollout role: the user's agent code (``agent.target``) plays each sample through an
OpenAI-compatible endpoint served by this replica, and each episode becomes one training sample.

    driver ──generate(requests, route)──▶ AgentRollout ──▶ agent.run(client, task) per sample
                                              ▲                 │ openai client, base_url =
                                              │                 │ http://127.0.0.1:PORT/relaxrl/<run>/<episode>/v1
                                              └─ Serve HTTP proxy (127.0.0.1) ◀─ POST /chat/completions
                                    AgentRollout.__call__: messages → token-exact context (openai_endpoint.py)
                                      → policy Rollout.generate (current weights: ids, log-probs, version)
                                      → recorded under the episode → chat.completion
    episode done: one Sample (prompt = first call's prompt; response = every later id, loss mask 1 on
    sampled ids) → reward (the agent's return, else the env's verifier) → the route's next stops → queue

Why this shape. The agent's client must reach the policy by HTTP, so the endpoint is Serve's HTTP
proxy (started by ``launch.init_ray`` on ``ray.host`` = 127.0.0.1 only) routing to this deployment.
The episode's record lives where its agent runs: one replica of this deployment holds both, so a
call needs no lookup elsewhere (Serve's proxy cannot pick a replica by episode; a second replica
would receive calls for episodes it never opened). Generation is not done here: each call goes to
the policy ``Rollout`` deployment (``rollout.num_replicas``, any engine), whose ``serve.batch``
merges the calls of concurrent episodes into one generate call and which follows the published
weights as for single-turn runs. The reward role is skipped: an agent returning a float has scored
its episode, and the env's verifier for the rest runs here under the same guard
(``GuardedVerifier``). The tasks come from the route's reward stop, where the driver puts them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace
from typing import Any, Optional

from ray import serve

from relaxrl.envs.base import Task
from relaxrl.groups import GroupRequest
from relaxrl.sample import Sample
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import quiet_replica_logs
from relaxrl.services.openai_endpoint import (EPISODE_PATH, MAX_BODY_BYTES, EndpointError, EpisodeBook, copy_chat,
                                              completion_body, cut_reply, episode_sample, models_body, parse_request)

log = logging.getLogger(__name__)


def route_prefix(run_id: str) -> str:
    """The endpoint's HTTP route: one per run, so two runs on one Serve instance do not collide."""
    return f"/relaxrl/{run_id}"


# Calls in flight: the driver's requests (each waits on its agents) and the agents' HTTP calls,
# which come back to this same replica. A cap at the driver's count would leave the calls queued
# behind the requests that wait for them; bounded in practice by the episodes in flight.
MAX_ONGOING = 100_000


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class AgentRollout:
    def __init__(self, policy: Any, model_dir: str, *, agent: dict, env: dict, sampling: dict, base_url: str,
                 max_model_len: Optional[int] = None, reward: Optional[dict] = None) -> None:
        from relaxrl.envs.agent import is_async_agent, make_agent
        from relaxrl.envs.chat_tokens import ChatFormat
        from relaxrl.envs.guarded import GuardedVerifier
        from relaxrl.envs.registry import make_env
        from relaxrl.models.loading import load_tokenizer

        quiet_replica_logs()
        self.policy = policy  # the policy Rollout deployment's handle
        self.agent = make_agent(agent["target"], imports=agent.get("imports", ()), args=agent.get("args"))
        self.is_async = is_async_agent(self.agent)
        self.timeout_s, self.api_key = float(agent["timeout_s"]), "relaxrl"  # the endpoint checks no key
        self.model_name = agent.get("model_name", "relaxrl-policy")
        self.tokenizer = load_tokenizer(model_dir)
        self.fmt = ChatFormat(self.tokenizer, env.get("prompt_template"))
        self.book = EpisodeBook(self.fmt, int(agent["max_calls"]))
        self.sampling, self.base_url, self.max_model_len = dict(sampling), base_url.rstrip("/"), max_model_len
        r = reward or {}
        self.verifier = GuardedVerifier(make_env(**env).verify, timeout_s=r.get("timeout_s", 10.0),
                                        max_workers=r.get("max_workers", 8), on_error=r.get("on_error", "drop"),
                                        error_reward=r.get("error_reward", 0.0))
        self.forwarder = Forwarder()
        self.counts = {"episodes": 0, "calls": 0, "refused_calls": 0, "retried_calls": 0, "agent_errors": 0}

    # --- the rollout interface ----------------------------------------------------------------
    async def generate(self, requests: list[GroupRequest], route: Optional[Route] = None,
                       tasks: Optional[dict[str, Task]] = None) -> Any:
        """One episode per sample of ``requests``, played by the agent; with a ``route``, the samples
        go on to its stops after the reward role (the agent or the verifier here scored them)."""
        route, tasks = _without_reward(route, tasks)
        start = time.time()
        jobs = [self._episode(r, k, tasks[r.group_id]) for r in requests for k in range(r.n)]
        samples = list(await asyncio.gather(*jobs))
        unscored = [i for i, s in enumerate(samples) if s.reward is None and "error" not in s.reward_info]
        if unscored:  # the agent returned None: the env's verifier scores the last reply
            scored = await self.verifier.score([samples[i] for i in unscored], tasks)
            for i, s in zip(unscored, scored):
                samples[i] = s
        timings = {"gen_start": start, "gen_end": time.time()}  # one dict for the request (Sample.timings)
        for s in samples:
            s.timings = timings
        return await self.forwarder.forward(samples, route)

    async def _episode(self, request: GroupRequest, index: int, task: Task) -> Sample:
        eid = f"{request.group_id}-{index}-{secrets.token_hex(6)}"  # unguessable, and fresh for a retried request
        episode = self.book.open(eid)
        episode.request = request  # what its calls are generated for (seed, the weights they wait for)
        self.counts["episodes"] += 1
        error, reward = None, None
        try:
            reward = await asyncio.wait_for(self._run_agent(eid, task), self.timeout_s)
        except asyncio.TimeoutError:
            error = {"error": "agent_timeout", "detail": f"the episode ran past agent.timeout_s={self.timeout_s}"}
        except Exception as e:  # agent code: its failure drops this sample's group, counted by the queue
            error = {"error": "agent_error", "detail": f"{type(e).__name__}: {e}"[:300]}
        finally:
            self.book.close(eid)
        sample = Sample(uid=f"{request.group_id}/{index}", group_id=request.group_id, index=index,
                        prompt_ids=list(request.prompt_ids), domain=request.domain, env=request.env,
                        answer=request.answer)
        sample = episode_sample(sample, episode.chat, episode.calls, reward, error)
        if "error" in sample.reward_info:
            self.counts["agent_errors"] += 1
            log.warning("episode %s (task %s): %s %s", eid, task.task_id, sample.reward_info["error"],
                        sample.reward_info["detail"])
        return sample

    async def _run_agent(self, eid: str, task: Task) -> Any:
        import openai

        url = f"{self.base_url}/{eid}/v1"
        # trust_env=False: loopback calls never go through an HTTP(S)_PROXY from the environment.
        if self.is_async:
            client = openai.AsyncOpenAI(base_url=url, api_key=self.api_key, timeout=self.timeout_s,
                                        http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
            try:
                return await self.agent.run(client, task)
            finally:
                await client.close()

        def run_sync() -> Any:
            with openai.OpenAI(base_url=url, api_key=self.api_key, timeout=self.timeout_s,
                               http_client=openai.DefaultHttpxClient(trust_env=False)) as client:
                return self.agent.run(client, task)

        return await asyncio.to_thread(run_sync)

    # --- the HTTP endpoint --------------------------------------------------------------------
    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            m = EPISODE_PATH.search(request.url.path)
            if m is None:
                raise EndpointError(404, f"no route {request.url.path}: the endpoint serves "
                                    "<base_url>/chat/completions with base_url ending /<episode id>/v1",
                                    code="not_found_error")
            if m["what"] == "models":
                self.book.get(m["episode"])
                return JSONResponse(models_body(self.model_name))
            if request.method != "POST":
                raise EndpointError(405, f"{request.method} {request.url.path}: use POST")
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                raise EndpointError(413, f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
            return JSONResponse(await self.complete(m["episode"], body))
        except EndpointError as e:
            self.counts["refused_calls"] += 1
            log.warning("chat completion refused (%d): %s", e.status, e.message)
            return JSONResponse(e.body(), status_code=e.status)

    async def complete(self, episode_id: str, body: Any) -> dict:
        """One chat completion of an open episode: its token-exact context, a reply sampled by the
        policy, recorded; OpenAI's ``chat.completion`` body."""
        episode = self.book.get(episode_id)
        req = parse_request(body, temperature=self.sampling["temperature"], top_p=self.sampling.get("top_p", 1.0))
        async with episode.lock:
            retries = episode.retries
            chat = episode.context(req.messages)
            self.counts["retried_calls"] += episode.retries - retries
            context = chat.ids
            limit = self.max_model_len and self.max_model_len - int(self.sampling["max_new_tokens"])
            if limit and len(context) > limit:
                raise EndpointError(400, f"episode {episode_id}: the chat is {len(context)} tokens; the model's "
                                    f"context leaves {limit} for a prompt with rollout.max_new_tokens="
                                    f"{self.sampling['max_new_tokens']}", code="context_length_exceeded")
            r = episode.request
            seed = None if r.seed is None else (r.seed * 131 + episode.calls) % (2**31)
            call = GroupRequest(group_id=episode_id, prompt_ids=context, n=1, domain=r.domain, env=r.env,
                                seed=seed, min_version=r.min_version)
            [gen] = await self.policy.generate.remote([call])
            ids, logprobs, finish = cut_reply(gen.response_ids, gen.behaviour_logprobs, gen.finish_reason,
                                              req.max_tokens)
            text = gen.response_text if len(ids) == len(gen.response_ids) else self._text(ids, finish)
            before = copy_chat(chat)
            chat.add_action(ids, text, logprobs=logprobs, version=gen.policy_version, finish_reason=finish)
            episode.commit(before, chat)
            self.counts["calls"] += 1
            return completion_body(episode_id, episode.calls, req.model or self.model_name, text, finish, context,
                                   ids, gen.policy_version)

    def _text(self, ids: list[int], finish_reason: str) -> str:
        text_ids = ids[:-1] if finish_reason == "stop" else ids
        return self.tokenizer.decode(text_ids, skip_special_tokens=True)

    def stats(self) -> dict:
        return {**self.counts, "open_episodes": len(self.book)}

    async def policy_stats(self) -> dict:
        return await self.policy.stats.remote()

    def check_health(self) -> None:
        pass


def _without_reward(route: Optional[Route], tasks: Optional[dict[str, Task]]) -> tuple[Optional[Route], dict]:
    """The route after its reward stop, and the tasks that stop carried (the driver's route_for
    puts the reward role first, with every group's task)."""
    stops = route.stops if route is not None else ()
    if stops and stops[0].method == "score" and "tasks" in stops[0].kwargs:
        tasks = tasks if tasks is not None else stops[0].kwargs["tasks"]
        route = replace(route, stops=stops[1:])
    if tasks is None:
        raise ValueError("AgentRollout.generate needs the tasks: pass tasks={group_id: Task}, or a route whose "
                         "first stop is the reward role's score with them")
    if not isinstance(tasks, dict):
        raise TypeError(f"tasks must be {{group_id: Task}}, got {type(tasks).__name__}")
    return route, tasks


def agent_rollout_app(cfg: Any, model_dir: str, run_id: str, policy: Any) -> Any:
    """The run's rollout application with ``agent.target`` set: this deployment (one replica, the
    HTTP ingress at ``route_prefix(run_id)``) in front of ``policy``, the bound ``Rollout``."""
    from relaxrl.faults import replica_options
    from relaxrl.launch import plain

    a, ray_cfg = cfg.agent, cfg.ray
    arch_len = _max_model_len(model_dir)
    host = f"[{ray_cfg.host}]" if ":" in str(ray_cfg.host) else ray_cfg.host  # an IPv6 address in a URL
    return AgentRollout.options(num_replicas=1, ray_actor_options={"num_cpus": a.num_cpus},
                                **replica_options(cfg.faults)).bind(
        policy, model_dir, agent=plain(a), env=plain(cfg.env),
        sampling={"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                  "max_new_tokens": cfg.rollout.max_new_tokens},
        base_url=f"http://{host}:{ray_cfg.http_port}{route_prefix(run_id)}",
        max_model_len=arch_len, reward=plain(cfg.reward))


def _max_model_len(model_dir: str) -> Optional[int]:
    from relaxrl import checkpoint

    n = checkpoint.arch(model_dir).get("max_position_embeddings")
    return int(n) if n else None
