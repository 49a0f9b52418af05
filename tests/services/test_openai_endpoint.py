"""A two-turn, tool-using agent written against the openai client, trained through the OpenAI
endpoint on a real local Ray (no mocks): the ids the queue hands the trainer are the ids the
endpoint sampled, and the endpoint listens on 127.0.0.1 only."""

import asyncio
import json
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tests.integration.helpers import make_cfg

pytestmark = pytest.mark.ray

TARGET = "tests.services.test_openai_endpoint:RecordingAgent"  # importable in the replicas (repo root)


class RecordingAgent:
    """The example's CalcAgent, its client wrapped to write down what each completion returned."""

    def __init__(self, record: str) -> None:
        self.record = record

    async def run(self, client, task):
        from examples.agent_openai.calc_agent import CalcAgent

        calls = []

        async def create(**kwargs):
            out = await client.chat.completions.create(**kwargs)
            calls.append({**out.model_extra["relaxrl"], "content": out.choices[0].message.content,
                          "finish_reason": out.choices[0].finish_reason, "prompt_tokens": out.usage.prompt_tokens,
                          "base_url": str(client.base_url)})
            return out

        wrapped = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
        reward = await CalcAgent().run(wrapped, task)
        with open(self.record, "a") as f:
            f.write(json.dumps({"task": task.task_id, "calls": calls}) + "\n")
        return reward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (/proc/net/tcp and tcp6)."""
    out = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                if len(raw) == 4:
                    out.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    out.add(socket.inet_ntop(socket.AF_INET6, words))
    return out


def test_a_two_turn_openai_agent_trains_on_exactly_the_ids_the_endpoint_sampled(ray_local, tmp_path, model_cache):
    import ray
    from ray import serve

    from relaxrl import launch
    from relaxrl.algorithms import make_algorithm
    from relaxrl.driver import run_request
    from relaxrl.envs.agent import check_agent_config
    from relaxrl.envs.registry import make_env
    from relaxrl.groups import GroupRequest
    from relaxrl.models.chat import PromptEncoder
    from relaxrl.models.loading import load_tokenizer
    from relaxrl.queue import group_name

    port, record = free_port(), tmp_path / "calls.jsonl"
    cfg = make_cfg(tmp_path, model_cache, "model.warm_start.steps=0", "rollout.max_staleness=0",
                   "rollout.group_size=2", "rollout.groups_per_step=2", "rollout.max_new_tokens=4",
                   "ray.serve_proxy=HeadOnly", f"ray.http_port={port}", f"agent.target={TARGET}",
                   f"+agent.args={{record: '{record}'}}")
    check_agent_config(cfg)
    serve.shutdown()  # a Serve instance an earlier test started has no HTTP proxy
    launch.init_ray(cfg)
    model_dir = launch.prepare_model_dir(cfg)
    roles = launch.start_roles(cfg, model_dir, tuple(make_algorithm(launch.plain(cfg.algorithm)).required_fields))
    try:
        # Serve's HTTP proxy, the endpoint's only socket, listens on the loopback address only.
        assert listening_addresses(port) == {"127.0.0.1"}
        env, encoder = make_env(**launch.plain(cfg.env)), PromptEncoder(load_tokenizer(model_dir))
        stream, requests, tasks = env.tasks("train", cfg.seed), [], {}
        for seq, need in ray.get(roles.queue.admit_many.remote(2)):  # as the driver's produce loop does
            task, gid = next(stream), group_name(seq)
            tasks[gid] = task
            requests.append(GroupRequest(gid, encoder(task.prompt), n=2, domain=task.domain, env=env.name,
                                         answer=task.answer, seed=seq, min_version=need))
        asyncio.run(run_request(roles, requests, tasks, cfg.faults))  # agent rollout → queue, one chain
        batch = ray.get(roles.queue.get_batch.remote(2, 60.0, 0))  # what the queue hands the trainer
        episodes = [json.loads(line) for line in record.read_text().splitlines()]
        by_uid = {}  # episode ids are "<group>-<index>-<random>": the sample uid is "<group>/<index>"
        for e in episodes:
            group, index, _ = e["calls"][0]["episode_id"].rsplit("-", 2)
            by_uid[f"{group}/{index}"] = e["calls"]
        assert len(batch) == 4 and sorted(by_uid) == sorted(s.uid for s in batch)
        for s in batch:
            mine = by_uid[s.uid]
            assert [c["call"] for c in mine] == [1, 2], f"{s.uid}: two completions per episode"
            full = s.prompt_ids + s.response_ids
            assert s.prompt_ids == mine[0]["prompt_token_ids"]  # the first call's prompt, rendered once
            sampled_at = []
            for c in mine:  # each reply sits right after the context it was sampled from, id for id
                ctx, ids = c["prompt_token_ids"], c["completion_token_ids"]
                assert full[:len(ctx)] == ctx and full[len(ctx):len(ctx) + len(ids)] == ids
                assert c["prompt_tokens"] == len(ctx) and c["finish_reason"] in ("stop", "length")
                assert c["base_url"].startswith(f"http://127.0.0.1:{port}/relaxrl/{roles.run_id}/")
                sampled_at += range(len(ctx), len(ctx) + len(ids))
            assert len(full) == sampled_at[-1] + 1  # the sample ends with the last reply
            trained_at = [len(s.prompt_ids) + i for i, m in enumerate(s.loss_mask) if m]
            assert trained_at == sampled_at  # loss mask 1 exactly on the sampled ids, 0 on the tool's message
            assert s.policy_version == 0 and set(s.token_versions) == {0} and s.reward in (0.0, 1.0)
            assert s.response_text == mine[-1]["content"]
        # The trainer's log-probs of those ids, in those contexts, are the behaviour log-probs the
        # endpoint recorded (fresh weights): what it trains is what the policy sampled.
        metrics = roles.actor.train_step.remote([ray.put(batch)], 0).result()
        print(f"approx_kl_behaviour={metrics['approx_kl_behaviour']:.2e} samples={metrics['samples']}")
        assert metrics["version"] == 1 and metrics["samples"] == 4
        assert abs(metrics["approx_kl_behaviour"]) < 1e-5
        # An episode id the run never opened is a 404 in OpenAI's error format.
        url = f"http://127.0.0.1:{port}/relaxrl/{roles.run_id}/nope/v1/chat/completions"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(urllib.request.Request(url, data=b'{"messages": []}', method="POST"), timeout=30)
        assert e.value.code == 404 and "no open episode" in json.loads(e.value.read())["error"]["message"]
        stats = roles.rollout.stats.remote().result()
        assert stats["calls"] == 8 and stats["open_episodes"] == 0 and stats["agent_errors"] == 0
    finally:
        roles.shutdown()
        serve.shutdown()  # the next test's Serve starts without the proxy again
