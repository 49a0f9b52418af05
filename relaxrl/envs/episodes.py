"""Playing multi-turn episodes token-in/token-out, with a per-turn student/teacher mixture (no Ray).

At every turn the teacher labels the state (its action there), and acts with probability
``beta``; the student acts otherwise. The episode is one growing token sequence
(``relaxrl.envs.chat_tokens.ChatTokens``): the first observation rendered once, each action's ids
exactly as sampled (or, for a teacher turn, as the teacher gave them), each later observation
appended as the chat template's delta, tokenised once. Nothing is re-rendered, so the tokens
trained on are the tokens the policy produced.

An episode becomes one **trajectory sample** (``trajectory_sample``): the whole episode, loss mask
1 exactly on the student's sampled tokens, its behaviour log-probs and per-token weight versions,
and the teacher's labels of the states it visited (``Sample.labels``: state length, teacher ids).
``label_samples`` expands those into one cross-entropy sample per labelled state (DAgger).

Many episodes run concurrently as asyncio tasks: a student action is an awaited call (batched by
whoever serves it) and an env step can run in an executor, so a slow tool blocks only its episode.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Optional, Protocol, Sequence, Union

from relaxrl.engines.base import Generation
from relaxrl.envs.base import Task
from relaxrl.envs.chat_tokens import ChatFormat, ChatTokens
from relaxrl.envs.multiturn import MultiTurnEnv
from relaxrl.sample import Sample

TEACHER, STUDENT = "teacher", "student"
# Train seeds are drawn from [0, EVAL_SEED_BASE); held-out seeds start there: no episode evaluated
# was ever trained on.
EVAL_SEED_BASE = 10_000_000


def train_seeds(iteration: int, count: int, seed: int) -> list[int]:
    rng = random.Random(f"train-seeds:{seed}:{iteration}")
    return [rng.randrange(EVAL_SEED_BASE) for _ in range(count)]


def eval_seeds(count: int) -> list[int]:
    return [EVAL_SEED_BASE + i for i in range(count)]


def is_multi_turn(env: Any) -> bool:
    """A ``MultiTurnEnv`` (reset/step), as opposed to a single-turn env's task stream."""
    return callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None)) \
        and not callable(getattr(env, "tasks", None))


class SeedTasks:
    """A multi-turn env's train stream for the driver: task ``k`` is one env seed (``meta["seed"]``),
    deterministic per run seed, so admission, checkpoints and resume treat episodes like prompts."""

    def __init__(self, name: str) -> None:
        self.name = name

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        if split != "train":
            raise ValueError(f"multi-turn envs evaluate on held-out seeds (eval_seeds), not a {split!r} split")
        rng = random.Random(f"episode-seeds:{seed}")
        while True:
            s = rng.randrange(EVAL_SEED_BASE)
            yield Task(task_id=f"{self.name}-seed-{s}", prompt="", answer="", meta={"seed": s})


@dataclass
class EpisodeGroup:
    """One queue group as the episode rollout plays it: ``n`` episodes of env seed ``seed``."""

    group_id: str
    seed: int
    n: int
    beta: float = 0.0  # teacher probability per turn (DAgger's schedule at the admitted version)
    with_teacher: bool = False  # label every visited state (DAgger)
    env: str = ""
    min_version: int = 0  # generate with weights of at least this version (sent ahead)


class StudentPolicy(Protocol):
    async def __call__(self, state_ids: list[int], max_new_tokens: int) -> tuple[Generation, int]:
        """One sampled action for ``state_ids`` and the weight version that produced it."""


class Teacher(Protocol):
    async def label(self, env: MultiTurnEnv, state_ids: list[int]) -> Union[str, Generation]:
        """The teacher's action in the env's current state (``state_ids``): text (tokenised once,
        end of turn added) or a generation (its ids kept as they are)."""


class ExpertTeacher:
    """The env's programmatic expert."""

    async def label(self, env: MultiTurnEnv, state_ids: list[int]) -> str:
        return env.expert_action()


class ModelTeacher:
    """A model checkpoint's action (greedy when its policy samples at temperature 0), its ids as generated."""

    def __init__(self, policy: StudentPolicy, tokenizer: Any) -> None:
        self.policy, self.tokenizer = policy, tokenizer

    async def label(self, env: MultiTurnEnv, state_ids: list[int]) -> Generation:
        gen, _ = await self.policy(state_ids, env.max_action_tokens)
        return gen


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
    state_ids: list[int]  # the chat so far with the generation prompt: exactly what the actor saw
    actor: str  # TEACHER or STUDENT
    action: str
    label: Optional[str]  # the teacher's action text in this state (None without a teacher)
    observation: str
    reward: float
    policy_version: int = -1  # the student's weight version when it acted; -1 for teacher turns
    generation: Optional[Generation] = None  # the student's sampled tokens and log-probs
    label_ids: Optional[list[int]] = None  # the teacher's action ids (end of turn included)


@dataclass
class Episode:
    episode_id: str
    group_id: str  # episodes of the same seed form a GRPO group
    seed: int
    env: str
    first_observation: str
    chat: ChatTokens
    turns: list[Turn] = field(default_factory=list)
    success: bool = False
    info: dict = field(default_factory=dict)
    start_version: int = -1  # the student's weights when the episode started (its version if it never acts)

    @property
    def reward(self) -> float:
        return float(sum(t.reward for t in self.turns))

    @property
    def num_labels(self) -> int:
        return sum(t.label is not None for t in self.turns)

    def messages(self) -> list[dict]:
        return list(self.chat.messages)


def _label_of(fmt: ChatFormat, tokenizer: Any, out: Union[str, Generation]) -> tuple[str, list[int]]:
    if isinstance(out, Generation):
        return action_text(tokenizer, out), list(out.response_ids)
    return out, fmt.action_ids(out)


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
    prompt_template: Optional[str] = None,
    start_version: int = -1,
    fmt: Optional[ChatFormat] = None,
) -> Episode:
    """Play one episode; ``executor`` runs env steps off the event loop (slow tools)."""
    if student is None and beta < 1.0:
        raise ValueError("a student policy is needed when beta < 1")
    if teacher is None and beta > 0.0:
        raise ValueError("a teacher is needed when beta > 0")
    fmt = fmt or ChatFormat(tokenizer, prompt_template)
    rng = random.Random(f"mixture:{episode_id}")
    first = env.reset(seed)
    chat = ChatTokens.start(fmt, [{"role": "user", "content": first}])
    ep = Episode(episode_id, group_id, seed, env.name, first, chat, start_version=start_version)
    done = False
    while not done and len(ep.turns) < env.max_turns:
        state = chat.ids
        label, label_ids = None, None
        if teacher is not None:
            label, label_ids = _label_of(fmt, tokenizer, await teacher.label(env, state))
        actor = pick_actor(rng, beta)
        gen, version = None, -1
        if actor == TEACHER:
            action = label
            chat.add_action(label_ids, action, trained=False)
        else:
            gen, version = await student(state, env.max_action_tokens)
            action = action_text(tokenizer, gen)
            chat.add_action(gen.response_ids, action, logprobs=gen.logprobs, version=version,
                            finish_reason=gen.finish_reason)
        if executor is not None:
            result = await asyncio.get_running_loop().run_in_executor(executor, env.step, action)
        else:
            result = env.step(action)
        done = result.done
        ep.turns.append(Turn(state, actor, action, label, result.observation, result.reward, version, gen, label_ids))
        ep.info = dict(result.info)
        if not done and len(ep.turns) < env.max_turns:  # the last observation is never seen by the policy
            chat.add_messages([{"role": "user", "content": result.observation}])
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


def trajectory_sample(episode: Episode, tokenizer: Any = None, index: int = 0, uid: Optional[str] = None) -> Sample:
    """The whole episode as one sample, token-exact: loss mask 1 exactly on the student's sampled
    tokens, their behaviour log-probs, each token's weight version, and the teacher's labels."""
    chat = episode.chat
    student = [t.policy_version for t in episode.turns if t.actor == STUDENT]
    versions = chat.filled_versions()
    if versions and versions[0] < 0:  # the student never acted: its weights then stand for the episode
        versions = [episode.start_version] * len(versions)
    labels = [(len(t.state_ids), list(t.label_ids)) for t in episode.turns if t.label_ids is not None]
    info = {"success": float(episode.success), "turns": len(episode.turns), "student_turns": len(student)}
    return Sample(
        uid=uid or f"{episode.episode_id}/traj", group_id=episode.group_id, index=index,
        prompt_ids=list(chat.prompt_ids), env=episode.env, response_ids=list(chat.response_ids),
        loss_mask=list(chat.loss_mask), behaviour_logprobs=list(chat.logprobs),
        policy_version=min(student) if student else episode.start_version, token_versions=versions,
        finish_reason=chat.finish_reason, response_text="", reward=episode.reward, reward_info=info, labels=labels,
    )


def labels_of(sample: Sample) -> list[Sample]:
    """One cross-entropy sample per teacher label a trajectory carries: the state (a prefix of the
    trajectory's own ids) as prompt, the teacher's ids as response, all trained.

    ``policy_version = -1`` marks the response as teacher tokens (no student version made them)."""
    full = list(sample.prompt_ids) + list(sample.response_ids)
    out = []
    for k, (n, ids) in enumerate(sample.labels):
        if not 0 < n <= len(full):
            raise ValueError(f"{sample.uid}: label {k} at state length {n}, outside the {len(full)} ids")
        out.append(Sample(
            uid=f"{sample.uid}/t{k}", group_id=f"{sample.uid}/t{k}", index=0, prompt_ids=full[:n], env=sample.env,
            response_ids=list(ids), loss_mask=[1] * len(ids), behaviour_logprobs=[0.0] * len(ids), policy_version=-1,
            reward=sample.reward,
        ))
    return out


def label_samples(episode: Episode, tokenizer: Any = None) -> list[Sample]:
    """The episode's labelled states as cross-entropy samples (``labels_of`` its trajectory)."""
    traj = trajectory_sample(episode)
    out = labels_of(traj)
    base = f"{episode.episode_id}/traj/"
    for s in out:  # ids by episode and turn
        s.uid = s.group_id = f"{episode.episode_id}/" + s.uid[len(base):]
    return out
