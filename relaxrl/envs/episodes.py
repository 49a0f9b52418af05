"""Rolling out multi-turn episodes with a per-turn student/teacher mixture (DAgger), no Ray.

At every turn the teacher labels the state (its action there), and acts with probability
``beta``; the student acts otherwise. An episode yields two kinds of training sample:

* one **label sample** per visited state: prompt = the chat so far, response = the teacher's
  action, every response token trained (cross-entropy on the teacher's tokens);
* one **trajectory sample** for outcome RL: the whole chat, loss mask 1 only on the tokens the
  student itself generated (env/tool tokens and teacher turns are 0), with its behaviour log-probs.

Many episodes run concurrently as asyncio tasks: a student action is an awaited call (batched by
whoever serves it) and an env step can run in an executor, so a slow tool blocks only its episode.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol, Sequence

from relaxrl.engines.base import Generation
from relaxrl.envs.multiturn import MultiTurnEnv, messages_of, render_episode, render_ids
from relaxrl.sample import Sample

TEACHER, STUDENT = "teacher", "student"


class StudentPolicy(Protocol):
    async def __call__(self, state_ids: list[int], max_new_tokens: int) -> tuple[Generation, int]:
        """One sampled action for ``state_ids`` and the weight version that produced it."""


class Teacher(Protocol):
    async def label(self, env: MultiTurnEnv, state_ids: list[int]) -> str:
        """The teacher's action text in the env's current state (rendered as ``state_ids``)."""


class ExpertTeacher:
    """The env's programmatic expert."""

    async def label(self, env: MultiTurnEnv, state_ids: list[int]) -> str:
        return env.expert_action()


class ModelTeacher:
    """A model checkpoint's action (greedy when its policy samples at temperature 0)."""

    def __init__(self, policy: StudentPolicy, tokenizer: Any) -> None:
        self.policy, self.tokenizer = policy, tokenizer

    async def label(self, env: MultiTurnEnv, state_ids: list[int]) -> str:
        gen, _ = await self.policy(state_ids, env.max_action_tokens)
        return action_text(self.tokenizer, gen)


def pick_actor(rng: random.Random, beta: float) -> str:
    """The teacher with probability ``beta``, else the student (one draw per turn)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return TEACHER if rng.random() < beta else STUDENT


def action_text(tokenizer: Any, gen: Generation) -> str:
    ids = gen.response_ids[:-1] if gen.finish_reason == "stop" else gen.response_ids
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Turn:
    state_ids: list[int]  # the chat so far, rendered with the generation prompt: what the actor saw
    actor: str  # TEACHER or STUDENT
    action: str
    label: Optional[str]  # the teacher's action in this state (None without a teacher)
    observation: str
    reward: float
    policy_version: int = -1  # the student's weight version when it acted; -1 for teacher turns
    generation: Optional[Generation] = None  # the student's sampled tokens and log-probs


@dataclass
class Episode:
    episode_id: str
    group_id: str  # episodes of the same seed form a GRPO group
    seed: int
    env: str
    first_observation: str
    turns: list[Turn] = field(default_factory=list)
    success: bool = False
    info: dict = field(default_factory=dict)

    @property
    def reward(self) -> float:
        return float(sum(t.reward for t in self.turns))

    @property
    def num_labels(self) -> int:
        return sum(t.label is not None for t in self.turns)

    def messages(self) -> list[dict]:
        # The observation after the last action is never seen by the policy: leave it out.
        return messages_of(self.first_observation, [t.action for t in self.turns],
                           [t.observation for t in self.turns[:-1]])


async def run_episode(
    env: MultiTurnEnv,
    seed: int,
    *,
    tokenizer: Any,
    student: Optional[StudentPolicy],
    teacher: Optional[Teacher],
    beta: float,
    episode_id: str,
    group_id: str,
    executor: Optional[Executor] = None,
) -> Episode:
    """Play one episode; ``executor`` runs env steps off the event loop (slow tools)."""
    if student is None and beta < 1.0:
        raise ValueError("a student policy is needed when beta < 1")
    if teacher is None and beta > 0.0:
        raise ValueError("a teacher is needed when beta > 0")
    rng = random.Random(f"mixture:{episode_id}")
    ep = Episode(episode_id, group_id, seed, env.name, env.reset(seed))
    actions: list[str] = []
    observations: list[str] = []
    done = False
    while not done and len(ep.turns) < env.max_turns:
        state = render_ids(tokenizer, messages_of(ep.first_observation, actions, observations), True)
        label = await teacher.label(env, state) if teacher is not None else None
        actor = pick_actor(rng, beta)
        gen, version = None, -1
        if actor == TEACHER:
            action = label
        else:
            gen, version = await student(state, env.max_action_tokens)
            action = action_text(tokenizer, gen)
        if executor is not None:
            result = await asyncio.get_running_loop().run_in_executor(executor, env.step, action)
        else:
            result = env.step(action)
        done = result.done
        ep.turns.append(Turn(state, actor, action, label, result.observation, result.reward, version, gen))
        actions.append(action)
        observations.append(result.observation)
        ep.info = dict(result.info)
    ep.success = bool(ep.info.get("success", False))
    return ep


async def run_episodes(
    make_env: Callable[[], MultiTurnEnv],
    seeds: Sequence[int],
    *,
    group_size: int = 1,
    prefix: str = "ep",
    **kwargs: Any,
) -> list[Episode]:
    """``group_size`` concurrent episodes per seed, each with its own env object."""
    jobs: list[Awaitable[Episode]] = []
    for i, seed in enumerate(seeds):
        for j in range(group_size):
            jobs.append(run_episode(make_env(), seed, episode_id=f"{prefix}-{i}/{j}", group_id=f"{prefix}-{i}",
                                    **kwargs))
    return list(await asyncio.gather(*jobs))


def label_samples(episode: Episode, tokenizer: Any) -> list[Sample]:
    """One sample per labelled state: the state as prompt, the teacher's action as response.

    ``policy_version = -1`` marks the response as teacher tokens (no student version made them).
    """
    out = []
    msgs = episode.messages()
    for k, turn in enumerate(episode.turns):
        if turn.label is None:
            continue
        state_msgs = msgs[: 2 * k + 1]
        full = render_ids(tokenizer, state_msgs + [{"role": "assistant", "content": turn.label}], False)
        if full[: len(turn.state_ids)] != turn.state_ids:
            raise ValueError("chat template renders the state differently once an action follows it")
        response = full[len(turn.state_ids):]
        out.append(Sample(
            uid=f"{episode.episode_id}/t{k}", group_id=f"{episode.episode_id}/t{k}", index=0,
            prompt_ids=list(turn.state_ids), env=episode.env, response_ids=response,
            loss_mask=[1] * len(response), behaviour_logprobs=[0.0] * len(response), policy_version=-1,
            response_text=turn.label, reward=episode.reward,
        ))
    return out


def trajectory_sample(episode: Episode, tokenizer: Any, index: int = 0) -> Sample:
    """The whole episode as one sample; loss mask 1 exactly on the student's own generated tokens."""
    ids, mask, spans = render_episode(tokenizer, episode.messages())
    start = spans[0][0]
    logprobs = [0.0] * len(ids)
    versions = []
    untrainable = 0  # student turns whose rendering differs from the sampled tokens: not trained, counted
    for (a, b), turn in zip(spans, episode.turns):
        if turn.actor == TEACHER:
            mask[a:b] = [0] * (b - a)  # not the student's tokens: no outcome-RL gradient
            continue
        gen = turn.generation
        versions.append(turn.policy_version)
        rendered = ids[a:b]
        if rendered == gen.response_ids:
            logprobs[a:b] = gen.logprobs
        elif gen.finish_reason == "length" and rendered[: len(gen.response_ids)] == gen.response_ids:
            # Cut at max tokens: the template closed the turn with tokens never sampled.
            n = len(gen.response_ids)
            logprobs[a:a + n] = gen.logprobs
            mask[a + n:b] = [0] * (b - a - n)
        else:  # decoding dropped or merged tokens (e.g. a special token sampled mid-action)
            mask[a:b] = [0] * (b - a)
            untrainable += 1
    return Sample(
        uid=f"{episode.episode_id}/traj", group_id=episode.group_id, index=index, prompt_ids=ids[:start],
        env=episode.env, response_ids=ids[start:], loss_mask=mask[start:], behaviour_logprobs=logprobs[start:],
        policy_version=min(versions) if versions else -1, response_text="", reward=episode.reward,
        reward_info={"untrainable_turns": untrainable},
    )
