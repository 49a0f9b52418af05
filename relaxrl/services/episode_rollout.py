"""Episode rollout role: plays whole multi-turn episodes with the newest published weights.

One request is a batch of episodes; they run concurrently on the replica's event loop. Each
student action is one call to ``_act``, which ``serve.batch`` merges across all episodes (and
requests) waiting at that moment; env steps run in a thread pool, so an episode waiting on a slow
tool blocks nobody. The teacher is the env's expert, or a checkpoint served by the teacher
deployment (``Teacher.act``). Student actions are sampled, and their behaviour log-probs taken, at
the rollout's temperature; greedy requests (temperature 0, evaluation) report T=1 log-probs.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from ray import serve

from relaxrl.engines.base import Generation, SamplingParams
from relaxrl.services.common import WeightFollower, quiet_replica_logs, set_threads


@dataclass
class EpisodeRequest:
    seeds: list[int]
    beta: float  # teacher probability per turn
    prefix: str  # episode ids are "<prefix>-<i>/<j>"
    group_size: int = 1
    temperature: Optional[float] = None  # None: the rollout's sampling temperature; 0: greedy
    with_teacher: bool = True  # False: no labels (evaluation, outcome-only RL)


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
        teacher: str = "expert",  # expert | checkpoint | none
        teacher_app: Optional[str] = None,  # Serve app of the teacher deployment (teacher=checkpoint)
        dtype: str = "float32",
        torch_threads: int = 1,
        store_name: Optional[str] = None,
        namespace: str = "relaxrl",
        env_workers: int = 8,
        batch_max: int = 64,
        batch_wait_s: float = 0.005,
        seed: int = 0,
    ) -> None:
        from relaxrl.engines.hf_generation import HFGenerationEngine
        from relaxrl.envs.episodes import ExpertTeacher, ModelTeacher

        quiet_replica_logs()
        set_threads(torch_threads)
        self.engine = HFGenerationEngine.from_pretrained(model_dir, dtype=dtype, torch_threads=torch_threads,
                                                         role="episode rollout")
        self.tokenizer = self.engine.tokenizer
        self.weights = WeightFollower(self.engine, store_name, namespace)
        self.env_cfg = dict(env)
        self.sampling = SamplingParams(temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0))
        self.pool = ThreadPoolExecutor(max_workers=env_workers, thread_name_prefix="env")
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

    async def episodes(self, request: EpisodeRequest) -> list:
        from relaxrl.envs.episodes import run_episodes
        from relaxrl.envs.registry import make_env

        await self.weights.sync()  # between requests: one collection sees one version
        temp = self.sampling.temperature if request.temperature is None else request.temperature

        async def student(state_ids: list[int], max_new_tokens: int):
            return await self._act_batch((state_ids, max_new_tokens, temp))

        return await run_episodes(
            lambda: make_env(**self.env_cfg), request.seeds, group_size=request.group_size, prefix=request.prefix,
            tokenizer=self.tokenizer, student=student, teacher=self.teacher if request.with_teacher else None,
            beta=request.beta, executor=self.pool,
        )

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _act_batch(self, items: list[tuple[list[int], int, float]]) -> list[tuple[Generation, int]]:
        import asyncio

        out: list = [None] * len(items)
        self.actions += len(items)
        for temp in sorted({t for _, _, t in items}):  # one generate call per temperature in the batch
            idx = [i for i, (_, _, t) in enumerate(items) if t == temp]
            self.calls += 1
            params = dataclasses.replace(self.sampling, temperature=temp, seed=self.seed * 1_000_003 + self.calls,
                                         max_new_tokens=max(items[i][1] for i in idx))
            gens = await asyncio.to_thread(self.engine.generate, [items[i][0] for i in idx], params)
            for i, g in zip(idx, gens):
                n = items[i][1]
                if len(g.response_ids) > n:
                    g = Generation(g.response_ids[:n], g.logprobs[:n], "length")
                out[i] = (g, self.engine.version)
        return out

    def stats(self) -> dict:
        return {"version": self.engine.version, "generate_calls": self.calls, "student_actions": self.actions}
