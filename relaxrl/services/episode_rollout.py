"""Episode rollout role: the rollout of a multi-turn run. Plays whole episodes, token-in/token-out.

It takes the driver's requests like the single-turn rollout (``generate(requests, route)``): a
request is a few queue groups (``EpisodeGroup``: ``n`` episodes of one env seed), sent down the
same ``Route`` (relaxrl/services/chain.py) once their samples are built, so they reach the
staleness-bounded queue with the same accounting, retries and checkpoints as single-turn groups.
Episodes run concurrently on the replica's event loop. Each student action is one call to
``_act_batch``, which ``serve.batch`` merges across all episodes (and requests) waiting at that
moment; env steps run in a thread pool, so an episode waiting on a slow tool blocks nobody. The
teacher is the env's expert, or a checkpoint served by the teacher deployment (``Teacher.act``).
Student actions are sampled, and their behaviour log-probs taken, at the rollout's temperature;
greedy requests (temperature 0, evaluation) report T=1 log-probs.

Weights are synced between requests, so a request's episodes start on one version; a request
running alongside may load newer weights mid-episode, and each action records the version that
sampled it (``Sample.token_versions``; the queue bounds the oldest).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from ray import serve

from relaxrl.engines.base import Generation, SamplingParams
from relaxrl.services.chain import Forwarder, Route
from relaxrl.services.common import WeightFollower, keep_off_cpus, quiet_replica_logs, set_threads


class HandlePolicy:
    """A teacher checkpoint's action through the teacher deployment, as an episode policy."""

    def __init__(self, handle, max_new_tokens: int) -> None:
        self.handle, self.max_new_tokens = handle, max_new_tokens

    async def __call__(self, state_ids: list[int], max_new_tokens: int) -> tuple[Generation, int]:
        return await self.handle.act.remote(state_ids, max_new_tokens), -1


@serve.deployment(max_ongoing_requests=64)
class EpisodeRollout:
    def __init__(
        self,
        model_dir: str,
        *,
        env: dict,
        sampling: dict,
        teacher: str = "none",  # expert | checkpoint | none
        teacher_app: Optional[str] = None,  # Serve app of the teacher deployment (teacher=checkpoint)
        dtype: str = "float32",
        torch_threads: int = 1,
        store_name: Optional[str] = None,
        namespace: str = "relaxrl",
        env_workers: int = 8,
        batch_max: int = 64,
        batch_wait_s: float = 0.005,
        seed: int = 0,
        prompt_template: Optional[str] = None,
        avoid_cpus: Sequence[int] = (),
    ) -> None:
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.envs.chat_tokens import ChatFormat
        from relaxrl.envs.episodes import ExpertTeacher, ModelTeacher

        quiet_replica_logs()
        keep_off_cpus(avoid_cpus)
        set_threads(torch_threads)
        self.engine = HFGenerationEngine.from_pretrained(model_dir, dtype=dtype, torch_threads=torch_threads,
                                                         role="episode rollout")
        self.tokenizer = self.engine.tokenizer
        self.fmt = ChatFormat(self.tokenizer, prompt_template)
        self.weights = WeightFollower(self.engine, store_name, namespace)
        self.env_cfg = dict(env)
        self.sampling = SamplingParams(temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0))
        self.pool = ThreadPoolExecutor(max_workers=env_workers, thread_name_prefix="env")
        self.forwarder = Forwarder()
        # Weights load on the event loop, generation in a thread: never both at once.
        self._engine_lock = asyncio.Lock()
        self.seed, self.calls, self.actions = seed, 0, 0  # generate calls vs student actions: the batching
        if teacher == "expert":
            self.teacher = ExpertTeacher()
        elif teacher == "checkpoint":
            if not teacher_app:
                raise ValueError("teacher=checkpoint needs the teacher deployment's app name")
            self.teacher = ModelTeacher(HandlePolicy(serve.get_app_handle(teacher_app), 0), self.tokenizer)
        elif teacher == "none":
            self.teacher = None
        else:
            raise ValueError(f"teacher must be expert, checkpoint or none, got {teacher!r}")
        self._act_batch.set_max_batch_size(batch_max)
        self._act_batch.set_batch_wait_timeout_s(batch_wait_s)

    def _student(self, temperature: float):
        async def student(state_ids: list[int], max_new_tokens: int):
            return await self._act_batch((state_ids, max_new_tokens, temperature))

        return student

    async def _play(self, seeds: Sequence[tuple[str, int, int, float, bool]], temperature: float) -> list:
        """Episodes ``(episode id, group id, seed, beta, with_teacher)`` played concurrently."""
        from relaxrl.envs.episodes import run_episode
        from relaxrl.envs.registry import make_env

        student, version = self._student(temperature), self.engine.version
        return list(await asyncio.gather(*(
            run_episode(make_env(**self.env_cfg), seed, tokenizer=self.tokenizer, student=student,
                        teacher=self.teacher if with_teacher else None, beta=beta, episode_id=eid, group_id=gid,
                        executor=self.pool, start_version=version, fmt=self.fmt)
            for eid, gid, seed, beta, with_teacher in seeds)))

    async def generate(self, requests: list, route: Optional[Route] = None) -> Any:
        """Play each group's episodes and send their trajectory samples (one per episode, index =
        episode) on along ``route``; without one, return them. A request sent ahead of the weights
        it needs (``min_version``) waits for their publication first."""
        from relaxrl.envs.episodes import trajectory_sample

        need = max((r.min_version for r in requests), default=0)
        await self.weights.wait_for(need)
        async with self._engine_lock:  # between requests: a request's episodes start on one version
            timings = await self.weights.sync()
        gen_start = time.time()
        plan = [(f"{r.group_id}/e{j}", r.group_id, r.seed, r.beta, r.with_teacher) for r in requests for j in range(r.n)]
        episodes = await self._play(plan, self.sampling.temperature)
        timings = {**timings, "gen_start": gen_start, "gen_end": time.time()}
        samples, it = [], iter(episodes)
        for r in requests:
            for j in range(r.n):
                s = trajectory_sample(next(it), index=j, uid=f"{r.group_id}/{j}")
                s.env, s.timings = r.env, timings
                samples.append(s)
        return await self.forwarder.forward(samples, route)

    async def evaluate(self, seeds: list[int], temperature: Optional[float] = None) -> dict:
        """Held-out success of the student alone on ``seeds`` with the newest weights (mean turns too)."""
        async with self._engine_lock:
            await self.weights.sync()
        temp = self.sampling.temperature if temperature is None else temperature
        eps = await self._play([(f"eval-{s}", f"eval-{s}", s, 0.0, False) for s in seeds], temp)
        return {"success": sum(e.success for e in eps) / len(eps), "turns": sum(len(e.turns) for e in eps) / len(eps),
                "version": self.engine.version}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _act_batch(self, items: list[tuple[list[int], int, float]]) -> list[tuple[Generation, int]]:
        out: list = [None] * len(items)
        self.actions += len(items)
        for temp in sorted({t for _, _, t in items}):  # one generate call per temperature in the batch
            idx = [i for i, (_, _, t) in enumerate(items) if t == temp]
            self.calls += 1
            params = dataclasses.replace(self.sampling, temperature=temp, seed=self.seed * 1_000_003 + self.calls,
                                         max_new_tokens=max(items[i][1] for i in idx))
            async with self._engine_lock:
                version = self.engine.version
                gens = await asyncio.to_thread(self.engine.generate, [items[i][0] for i in idx], params)
            for i, g in zip(idx, gens):
                n = items[i][1]
                if len(g.response_ids) > n:
                    g = Generation(g.response_ids[:n], g.logprobs[:n], "length")
                out[i] = (g, version)
        return out

    def stats(self) -> dict:
        return {"version": self.engine.version, "generate_calls": self.calls, "student_actions": self.actions}


class EpisodeHeldout:
    """The step hook (``driver.StepHook``) of a multi-turn run: at step 0, every ``every`` steps and
    at the last, the student alone plays the held-out seeds (``eval_seeds``) on the episode rollout
    with the weights just published, sampled at the rollout temperature and greedy. Logs
    ``eval/success``, ``eval/success_greedy`` (and mean turns) like training metrics; keeps the
    last step's DAgger label counts for the summary."""

    def __init__(self, rollout: Any, monitor: Any, *, every: int, last_step: int, episodes: int) -> None:
        from relaxrl.envs.episodes import eval_seeds

        self.rollout, self.monitor = rollout, monitor
        self.every, self.last_step, self.seeds = every, last_step, eval_seeds(episodes)
        self.history: list[dict] = []
        self.last_metrics: dict = {}

    def due(self, step: int) -> bool:
        if step in (0, self.last_step):
            return True
        return bool(self.every) and step % self.every == 0

    async def __call__(self, roles: Any, step: int, metrics: dict) -> dict:
        if metrics:
            self.last_metrics = dict(metrics)
        if not self.due(step):
            return {}
        sampled, greedy = await asyncio.gather(self.rollout.evaluate.remote(self.seeds),
                                               self.rollout.evaluate.remote(self.seeds, 0.0))
        out = {"eval/success": sampled["success"], "eval/success_greedy": greedy["success"],
               "eval/turns": sampled["turns"], "eval/n": len(self.seeds)}
        self.history.append({"step": step, **out})
        if step == 0:
            self.monitor.log(0, out, advance=False)
        return out
