"""The two loops of a run, as asyncio tasks calling the role deployments.

    produce:  admit groups → rollout.generate → reward.score → (teacher.score) → queue.put
    train:    queue.get_batch → actor.train_step (publishes weights v+1) → queue.set_version(v+1)

A request carries several prompt groups (``rollout.groups_per_request``), so each role call and
each queue call is paid per request, not per group. Requests for the next step's groups are sent
before the weights they need exist (``rollout.admit_ahead_steps``): they wait in the rollout and
start the moment the trainer publishes, so even with ``max_staleness=0`` no driver round trip lies
between one step's training and the next step's generation. The trainer gets step k+1's request
while it still trains step k, so it never waits on the driver between steps. Several ``produce`` tasks run
at once; the queue's admission gate bounds how far ahead of the trainer they may get, so with
``max_staleness >= 1`` generation overlaps training and with 0 it alternates with it. The driver
never holds a batch: samples flow between roles as object refs.

A multi-turn run is the same loops: a group is the episodes of one env seed (``build_request``),
the rollout is the episode rollout and the env's steps reward the episodes (no reward stop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from omegaconf import DictConfig

from relaxrl import checkpoint
from relaxrl.envs.base import Task
from relaxrl.faults import ReplicaStateLost, fault_reason, is_retryable, kill_replicas, wait_replaced
from relaxrl.launch import Roles
from relaxrl.metrics import clip_intervals, first_last_mean, overlap_length, total_length
from relaxrl.monitor import Monitor
from relaxrl.queue import BatchRequest, QueueError, group_name
from relaxrl.groups import GroupRequest, groups_per_request
from relaxrl.services.chain import Route, Stop

log = logging.getLogger(__name__)

# Awaited with step 0 before training and after every step, while the actor still holds (and has
# published) that step's weights; returns extra metrics for the step (e.g. periodic evaluation).
# A hook with a ``due(step) -> bool`` method acts only where it is True (elsewhere it returns {}),
# and the steps in between keep the trainer's next request sent ahead.
StepHook = Callable[[Roles, int, dict], Awaitable[dict]]


class TaskStream:
    """Task ``k`` of the env's train stream for admitted group ``k``: deterministic per seed.

    A resumed run starts at ``start`` (groups admitted before its checkpoint), keeping the tasks of
    the groups that were in flight then (``keep``), which it generates again."""

    def __init__(self, env: Any, seed: int, start: int = 0, keep: tuple[int, ...] = ()) -> None:
        self._it = env.tasks("train", seed)
        self._cache: dict[int, Task] = {}
        self._next = 0
        keep_set = set(keep)
        for k in range(start):
            task = next(self._it)
            if k in keep_set:
                self._cache[k] = task
        self._next = start

    def get(self, k: int) -> Task:
        while self._next <= k:
            self._cache[self._next] = next(self._it)
            self._next += 1
        return self._cache.pop(k)


@dataclass
class RunResult:
    steps: int = 0
    t0: float = 0.0  # wall clock when the loops started; the run's window is [t0, t0 + wall_s]
    wall_s: float = 0.0
    rewards: list[float] = field(default_factory=list)
    # Busy intervals (wall clock) per stage: gen, weights (rollout load), reward, teacher, train, publish.
    stage_intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    queue: dict = field(default_factory=dict)
    producer_errors: int = 0
    prompts_rejected: int = 0
    checkpoint: Optional[str] = None
    resumed_from: Optional[str] = None
    start_step: int = 0
    start_version: int = 0
    published: Any = None  # relaxrl.weights.Published of the last weight version
    trainer_restarts: int = 0  # lost trainers restored in this run from its newest checkpoint
    restored_from: list[str] = field(default_factory=list)  # the checkpoint of each such restore
    # Groups the checkpoint resumed from holds a partial rollout of: the produce loops take each from
    # the queue when it is re-issued and send it with its request, to be continued (relaxrl.partial).
    resume_partials: set[str] = field(default_factory=set)

    def summary(self) -> dict:
        first, last = first_last_mean(self.rewards)
        # Generation still running when the run ends (or before it starts) is outside its wall time.
        gen_iv, train_iv = (clip_intervals(self.stage_intervals.get(k, []), self.t0, self.t0 + self.wall_s)
                            for k in ("gen", "train"))
        gen, train = total_length(gen_iv), total_length(train_iv)
        both = overlap_length(gen_iv, train_iv)
        wall = max(self.wall_s, 1e-9)
        steps = max(self.steps, 1)
        return {
            "steps": self.steps,
            "wall_s": self.wall_s,
            "reward_first": first,
            "reward_last": last,
            "max_staleness_seen": self.queue.get("max_staleness_seen", 0),
            "dropped": self.queue.get("dropped_samples", 0),
            "dropped_by_reason": self.queue.get("dropped_by_reason", {}),
            "gen_busy_frac": gen / wall,
            "train_busy_frac": train / wall,
            "overlap_frac": both / wall,
            # Seconds each stage was busy per step (union of its intervals), for the benchmarks.
            "stage_s_per_step": {k: total_length(v) / steps for k, v in sorted(self.stage_intervals.items())},
            "staleness_hist": self.queue.get("staleness_hist", {}),
            "checkpoint": self.checkpoint,
            "producer_errors": self.producer_errors,
            "retried_by_reason": self.queue.get("retried_by_reason", {}),
            # Generations aborted by a weight update and re-queued with their prompt (relaxrl.partial).
            "partial_aborted": self.queue.get("partial_aborted", 0),
            # A resumed run's recorded partial rollouts: continued from their tokens, or generated again.
            "partials_continued": self.queue.get("partials_continued", 0),
            "partials_discarded": self.queue.get("partials_discarded", 0),
            # Generations a weight update aborted and the rollout started again in place (every replica).
            "partial_regenerated": self.queue.get("partial_regenerated", 0),
            "accounting": {k: self.queue.get(k) for k in ACCOUNTING_KEYS},
            "resumed_from": self.resumed_from,
            "trainer_restarts": self.trainer_restarts,
            "restored_from": self.restored_from,
            "weights_kind": getattr(self.published, "kind", None),
            "weights_nbytes": getattr(self.published, "nbytes", 0),
        }


ACCOUNTING_KEYS = ("admitted_samples", "generated_samples", "rewarded_samples", "trained_samples",
                   "dropped_samples", "in_flight_samples")


class VersionClock:
    """The trainer's weight version as the driver knows it (set after every step): a request sent
    ahead of its weights starts its timeout only once they exist, and is called off if the run ends
    first."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self.closed = False
        self._changed = asyncio.Condition()

    async def set(self, version: int) -> None:
        async with self._changed:
            self.version = version
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def reached(self, version: int) -> bool:
        """Wait until the trainer is at ``version`` (True) or the run has ended before it (False)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.closed or self.version >= version)
            return self.version >= version


# (task, group id, admission seq, weight version it needs) -> a rollout request for that group.
RequestBuilder = Callable[[Task, str, int, int], Any]


async def produce(roles: Roles, tasks: TaskStream, cfg: DictConfig, prompt_ids: Any, stats: RunResult,
                  max_prompt_tokens: Optional[int] = None, per_request: int = 1,
                  clock: Optional[VersionClock] = None, build_request: Optional[RequestBuilder] = None) -> None:
    """Keep admitting up to ``per_request`` groups at a time and sending them down the chain as
    one request, until the queue closes. ``build_request``: a multi-turn run's request per group
    (``relaxrl.envs.episodes.EpisodeGroup``) in place of a prompt group."""
    # Read once: a DictConfig attribute costs ~30 µs on a small CPU, and these are needed per group.
    group_size, env_name, seed = cfg.rollout.group_size, cfg.env.name, cfg.seed
    while (admitted := await roles.queue.admit_many.remote(per_request)) is not None:
        requests, by_group = [], {}
        for seq, need in admitted:
            task, gid = tasks.get(seq), group_name(seq)
            if build_request is not None:
                requests.append(build_request(task, gid, seq, need))
                by_group[gid] = task
                continue
            ids = prompt_ids(task.prompt)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                stats.prompts_rejected += 1
                log.warning("task %s rejected: prompt of %d tokens + max_new_tokens exceeds the model's context "
                            "(at most %d prompt tokens)", task.task_id, len(ids), max_prompt_tokens)
                await roles.queue.abandon.remote(gid, "prompt_too_long")
                continue
            requests.append(GroupRequest(group_id=gid, prompt_ids=ids, n=group_size,
                                         domain=task.domain, env=env_name, answer=task.answer,
                                         seed=seed * 1_000_003 + seq, min_version=need))
            by_group[gid] = task
        if not requests:
            continue
        partials = None
        if stats.resume_partials and (kept := [gid for gid in by_group if gid in stats.resume_partials]):
            stats.resume_partials.difference_update(kept)
            partials = await roles.queue.take_partials.remote(kept)
        try:
            await run_request(roles, requests, by_group, cfg.faults, clock, partials)
        except Exception as e:  # a failed role call drops the request's groups, counted; never silently
            stats.producer_errors += 1
            log.warning("groups %s failed: %s", list(by_group), e)
            await roles.queue.abandon_many.remote(list(by_group), f"error_{fault_reason(e)}")


async def run_request(roles: Roles, requests: list[GroupRequest], tasks: dict[str, Task], faults: Any,
                      clock: Optional[VersionClock] = None, partials: Optional[dict[str, dict]] = None) -> None:
    """generate → reward → (teacher) → queue for one request's groups. A chain lost to a dead or
    hung replica (or slower than ``faults.role_timeout_s``, counted from when the weights it waits
    for exist) is sent again with the same requests and seeds (Serve routes it to a live or
    restarted replica) up to ``faults.max_retries`` times. The put is the chain's last step and
    carries the attempt number: a retry whose earlier attempt reached the queue after all (its
    answer lost, or timed out just after) has its samples ignored there, so none is queued twice.
    A chain still waiting for weights when the run ends is called off: its groups stay in flight
    (counted, and generated again by a resumed run). ``partials``: a resumed run's recorded partial
    rollouts of some of these groups, sent with every attempt (the rollout continues them)."""
    need = max(r.min_version for r in requests)
    for attempt in range(faults.max_retries + 1):
        try:
            return await _timed_from(_chain_to_queue(roles, requests, tasks, attempt, partials), faults.role_timeout_s,
                                     clock, need)
        except Exception as e:
            if attempt == faults.max_retries or not is_retryable(e):
                raise
            log.warning("groups %s: %s; retrying (%d/%d)", list(tasks), e, attempt + 1, faults.max_retries)
            await roles.queue.note_retry.remote(fault_reason(e))
            await asyncio.sleep(min(2.0**attempt, 10.0))  # give Serve time to notice and replace the replica
    raise AssertionError("unreachable")


async def _timed_from(chain: Awaitable, timeout_s: float, clock: Optional[VersionClock], need: int) -> None:
    """``chain`` with ``timeout_s`` counted from when the trainer reaches version ``need``."""
    task = asyncio.ensure_future(chain)
    try:
        if clock is not None and clock.version < need:
            reached = asyncio.ensure_future(clock.reached(need))
            try:
                await asyncio.wait({task, reached}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                reached.cancel()
            if not task.done() and not reached.result():  # then `reached` finished first
                task.cancel()  # the run ended before these weights: nothing to generate with
                await asyncio.gather(task, return_exceptions=True)
                return
        await asyncio.wait_for(task, timeout_s)
    finally:
        task.cancel()  # a no-op once done; stops the chain if this call is cancelled


async def _chain_to_queue(roles: Roles, requests: list[GroupRequest], tasks: dict[str, Task], attempt: int,
                          partials: Optional[dict[str, dict]] = None) -> None:
    # One call: the rollout hands its samples to the reward role, which hands them on (teacher
    # calls, then the queue's put) along the route; nothing passes through here (relaxrl/services/chain.py).
    extra = {"partials": partials} if partials else {}  # only the streaming rollout takes them
    response = roles.rollout.generate.remote(requests, route=route_for(roles, requests, tasks, attempt), **extra)
    try:
        await response
    except asyncio.CancelledError:  # timed out or called off: Serve stops the chain where it is
        response.cancel()
        raise


def route_for(roles: Roles, requests: list[GroupRequest], tasks: dict[str, Task], attempt: int) -> Route:
    """The stops after the rollout: the reward role (none in a multi-turn run: the env's steps
    rewarded the episode), the teacher calls the algorithm needs, the queue."""
    stops = [Stop(roles.app("reward"), "score", {"tasks": tasks})] if roles.reward is not None else []
    if roles.teacher is not None:
        if roles.teacher_by_domain:  # Serve multiplexing: to a replica holding this domain's teacher
            domains = {r.domain for r in requests}  # several: the replica splits the samples by domain
            stops.append(Stop(roles.app("teacher"), "score", model_id=domains.pop() if len(domains) == 1 else ""))
        for name, fld in roles.teacher_calls:  # ref (base) log-probs, then teacher ones if needed
            stops.append(Stop(roles.app("teacher"), "score", {"name": name, "field": fld}))
    return Route(tuple(stops), roles.queue_name, roles.namespace, attempt)


class TrainerLost(RuntimeError):
    """The trainer replica failed or came back without its state. ``run`` restores it from the run's
    newest checkpoint (``faults.trainer_restarts`` times); past that, resume from a checkpoint."""


async def train(roles: Roles, cfg: DictConfig, monitor: Monitor, stats: RunResult, t0: float,
                on_step: Optional[StepHook] = None, clock: Optional[VersionClock] = None) -> None:
    """One optimizer step per batch of ``groups_per_step`` complete, fresh groups."""
    tr = cfg.trainer
    if on_step is not None and stats.start_step == 0:
        await on_step(roles, 0, {})
    version = stats.start_version
    ahead = None  # the next step's request, sent while this one trains

    def send(train_version: int) -> Any:  # the actor asks the queue for the batch itself: one hop
        batch = BatchRequest(cfg.rollout.groups_per_step, tr.get_batch_timeout_s, train_version)
        return roles.actor.train_step.remote(batch, train_version)

    for step in range(stats.start_step + 1, tr.steps + 1):
        response, ahead = ahead or send(version), None
        checkpoint_due = bool(tr.checkpoint_every) and step % tr.checkpoint_every == 0
        hook_due = on_step is not None and getattr(on_step, "due", lambda _: True)(step)
        if step < tr.steps and not hook_due and not checkpoint_due:
            # Step k+1 fetches and collates its batch while step k trains, and trains as soon as
            # step k is done: the trainer does not wait on the driver between steps. Not before a
            # checkpoint or a step hook that is due, which need no batch taken and untrained.
            ahead = send(version + 1)
        try:
            metrics = await response
            if metrics["version"] <= version:  # Serve restarted the actor from the initial weights
                raise TrainerLost(f"step {step}: the trainer came back at version {metrics['version']} after "
                                  f"{version}; its state is lost: continue the run with resume=true")
        except Exception as e:
            if ahead is not None:
                ahead.cancel()
            if isinstance(e, TrainerLost) or not (is_retryable(e) or isinstance(e, ReplicaStateLost)):
                raise
            raise TrainerLost(f"step {step}: the trainer replica was lost ({type(e).__name__}); continue the run "
                              f"with resume=true (newest checkpoint in {cfg.run_dir}/checkpoints)") from e
        version = metrics["version"]
        await roles.queue.set_version.remote(version)  # published: admission opens for the next groups
        if clock is not None:
            await clock.set(version)
        stats.steps = step
        stats.rewards.append(metrics["reward_mean"])
        for stage in ("train", "publish"):
            stats.stage_intervals.setdefault(stage, []).append((metrics[f"{stage}_start"], metrics[f"{stage}_end"]))
        log_trained(cfg.run_dir, step, version, metrics.pop("trained"))
        elapsed = time.time() - t0
        metrics["samples_per_s"] = (step - stats.start_step) * cfg.rollout.groups_per_step * cfg.rollout.group_size / elapsed
        metrics["wall_s"] = elapsed
        if on_step is not None:
            metrics.update(await on_step(roles, step, metrics))
        monitor.log(step, metrics)
        if checkpoint_due:
            stats.checkpoint = await save_checkpoint(roles, cfg, stats, f"step_{step}")


STAGE_INTERVALS = "stage_intervals.json"


def write_stage_intervals(run_dir: str, intervals: dict[str, list[tuple[float, float]]]) -> None:
    """Every stage's busy intervals (wall clock, s), for a timeline of the run: what each stage did
    and the hand-offs between them (``bench/critical_path.py`` reads it)."""
    with open(os.path.join(run_dir, STAGE_INTERVALS), "w") as f:
        json.dump({k: sorted(v) for k, v in intervals.items()}, f)


def log_trained(run_dir: str, step: int, version: int, trained: list) -> None:
    """Append one step's ordered (sample uid, policy version) pairs to the run's audit log."""
    with open(os.path.join(run_dir, checkpoint.TRAIN_LOG), "a") as f:
        f.write(json.dumps({"step": step, "version": version, "samples": trained}) + "\n")


# How long a checkpoint waits for the rollout replicas' partial rollouts: one that has not answered
# by then only costs its groups' kept tokens (a resumed run generates them again).
PARTIALS_TIMEOUT_S = 10.0


async def save_checkpoint(roles: Roles, cfg: DictConfig, stats: RunResult, name: str) -> str:
    """Trainer state, queue accounting and data position at one step, checked and complete or absent."""
    final = os.path.join(cfg.run_dir, "checkpoints", name)
    tmp = checkpoint.partial_dir(final)
    await roles.actor.save_checkpoint.remote(tmp)
    ledger = await roles.actor.ledger.remote()
    if cfg.rollout.streaming:  # the rollout replicas record their partial rollouts in flight first
        await roles.queue.collect_partials.remote(PARTIALS_TIMEOUT_S)
    snap = await roles.queue.snapshot.remote()  # raises if the accounting identity is broken
    if ledger["trained_count"] != snap["consumed_samples"] or ledger["distinct_uids"] != ledger["trained_count"]:
        raise QueueError(f"accounting broken at {name}: actor {ledger}, queue handed out {snap['consumed_samples']}")
    meta = {"step": stats.steps, "version": ledger["version"], "queue": snap, "rewards": stats.rewards,
            "arch": checkpoint.arch(roles.model_dir) if getattr(roles, "model_dir", None) else {},
            "lora": bool(cfg.model.lora.enabled), "seed": cfg.seed}
    return checkpoint.finish(tmp, final, meta, cfg.run_dir)


async def restore(roles: Roles, cfg: DictConfig, env: Any, path: str, stats: RunResult, monitor: Monitor) -> TaskStream:
    """Load a checkpoint into the fresh roles; returns the task stream at the checkpoint's position."""
    meta = checkpoint.load_meta(path)
    checkpoint.restore_run_files(path, cfg.run_dir)
    version = await roles.actor.load_checkpoint.remote(path)  # also publishes the restored weights
    await roles.queue.restore.remote(meta["queue"])
    tasks = _adopt(cfg, env, meta, version, stats, monitor)
    stats.resumed_from = path
    log.warning("resumed from %s at step %d (version %d); %d groups in flight are generated again (%d of them "
                "go on from their recorded partial rollouts)", path, stats.steps, version, len(meta["queue"]["in_flight"]),
                len(stats.resume_partials))
    return tasks


def _adopt(cfg: DictConfig, env: Any, meta: dict, version: int, stats: RunResult, monitor: Monitor) -> TaskStream:
    """The run goes on from checkpoint ``meta`` (weights at ``version``): its step, rewards, partial
    rollouts and metrics rows; returns the task stream at the checkpoint's position."""
    stats.start_step = stats.steps = int(meta["step"])
    stats.start_version = version
    stats.rewards = list(meta["rewards"])
    stats.resume_partials = set(checkpoint.partial_rollouts(meta))
    monitor.rewind(stats.steps)
    return TaskStream(env, cfg.seed, start=meta["queue"]["admitted"], keep=tuple(meta["queue"]["in_flight"]))


def restorable(cfg: DictConfig, stats: RunResult, lost: TrainerLost) -> str:
    """The checkpoint to restore a lost trainer from in this run: the run's newest. Raises ``lost``
    (it says to resume) once ``faults.trainer_restarts`` are used up or there is nothing to restore."""
    if stats.trainer_restarts >= cfg.faults.trainer_restarts:
        if cfg.faults.trainer_restarts:
            log.error("trainer lost again after %d in-run restores (faults.trainer_restarts)", stats.trainer_restarts)
        raise lost
    if cfg.weight_sync.method != "object_store":  # replaced rollout replicas would have to rejoin the broadcast
        raise TrainerLost(f"{lost} (an in-run restore needs weight_sync.method=object_store)") from lost
    path = checkpoint.latest(os.path.join(cfg.run_dir, "checkpoints"))
    if path is None:
        raise TrainerLost(f"{lost} (no checkpoint in this run to restore it from: set trainer.checkpoint_every)") \
            from lost
    cause = type(lost.__cause__).__name__ if lost.__cause__ is not None else "it came back without its state"
    log.warning("the trainer was lost after step %d (%s): restoring it in this run from %s (restart %d of "
                "faults.trainer_restarts=%d)", stats.steps, cause, path, stats.trainer_restarts + 1,
                cfg.faults.trainer_restarts)
    return path


async def restore_lost_trainer(roles: Roles, cfg: DictConfig, env: Any, path: str, stats: RunResult,
                               monitor: Monitor) -> TaskStream:
    """Put the run back at checkpoint ``path`` after its trainer was lost (the producers have
    stopped): the trainer replica Serve restarted loads it and publishes its weights, the rollout
    replicas are replaced (they hold newer weights, which they would never give up for older
    ones), the queue and the train log go back to the checkpoint, and the groups in flight then are
    generated again: the run goes on as a ``resume=PATH`` of that checkpoint would."""
    meta = checkpoint.load_meta(path)
    lost_at = stats.steps
    rollout = roles.app("rollout")
    old_rollouts = kill_replicas(rollout)
    await roles.weights.rollback.remote()
    version = await _call_restarted(lambda: roles.actor.load_checkpoint.remote(path),
                                    cfg.faults.trainer_restore_timeout_s)
    await wait_replaced(rollout, old_rollouts, cfg.rollout.num_replicas, cfg.faults.trainer_restore_timeout_s)
    # Every chain has ended (the producers returned), and the rollout replicas were replaced since:
    # no put of the lost run can still reach the queue once it is reset.
    await roles.queue.reset.remote(meta["queue"])
    checkpoint.restore_run_files(path, cfg.run_dir)  # the train log loses the steps after the checkpoint
    tasks = _adopt(cfg, env, meta, version, stats, monitor)
    stats.trainer_restarts += 1
    stats.restored_from.append(path)
    log.warning("trainer restored from %s at step %d (version %d): the %d steps trained since are lost and trained "
                "again; %d groups in flight then are generated again", path, stats.steps, version,
                lost_at - stats.steps, len(meta["queue"]["in_flight"]))
    return tasks


async def _call_restarted(call: Callable[[], Awaitable], timeout_s: float) -> Any:
    """``call()`` on a replica Serve is restarting: calls that reach the dead one are sent again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except Exception as e:
            if not is_retryable(e) or time.monotonic() > deadline:
                raise
            log.info("waiting for the restarted trainer replica: %s", type(e).__name__)
            await asyncio.sleep(0.5)


class ProducerFailed(RuntimeError):
    """A produce loop died of an error outside a request's role calls (those are retried or dropped
    and counted): nothing would feed the trainer any more, so the run stops with the cause."""


async def _train_watching(training: Awaitable, producers: list[asyncio.Task]) -> None:
    """Run the train loop; if a producer dies first, stop it and raise ``ProducerFailed`` at once
    instead of letting the trainer wait out ``trainer.get_batch_timeout_s`` for a batch."""
    trainer = asyncio.ensure_future(training)
    failure = asyncio.ensure_future(_first_failure(producers))
    try:
        await asyncio.wait({trainer, failure}, return_when=asyncio.FIRST_COMPLETED)
        if not trainer.done() and (error := failure.result()) is not None:
            trainer.cancel()
            await asyncio.gather(trainer, return_exceptions=True)
            raise ProducerFailed(f"a producer loop failed: {type(error).__name__}: {error}") from error
        await trainer
    finally:
        failure.cancel()
        trainer.cancel()  # a no-op once done; stops the train loop if this call is cancelled


async def _first_failure(tasks: list[asyncio.Task]) -> Optional[BaseException]:
    """The exception of the first of ``tasks`` to fail, or None once all have ended without one."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                return t.exception()
    return None


async def run(roles: Roles, cfg: DictConfig, env: Any, prompt_ids: Any, monitor: Monitor, *,
              resume: Optional[str] = None, max_prompt_tokens: Optional[int] = None,
              on_step: Optional[StepHook] = None, build_request: Optional[RequestBuilder] = None) -> RunResult:
    stats = RunResult()
    tasks = await restore(roles, cfg, env, resume, stats, monitor) if resume else TaskStream(env, cfg.seed)
    r = cfg.rollout
    inflight = r.max_inflight_groups or r.groups_per_step * (r.max_staleness + 1 + r.admit_ahead_steps)
    per_request = groups_per_request(r.groups_per_request, r.batch_max_groups, r.groups_per_step, r.num_replicas)
    t0 = stats.t0 = time.time()
    while True:  # once, plus once per in-run restore of a lost trainer
        clock = VersionClock(stats.start_version)
        producers = [asyncio.create_task(produce(roles, tasks, cfg, prompt_ids, stats, max_prompt_tokens,
                                                 per_request, clock, build_request))
                     for _ in range(-(-inflight // per_request))]
        restore_from = None
        try:
            await _train_watching(train(roles, cfg, monitor, stats, t0, on_step, clock), producers)
        except TrainerLost as lost:
            restore_from = restorable(cfg, stats, lost)  # raises it again when it cannot be restored here
        finally:
            stats.wall_s = time.time() - t0
            await clock.close()  # requests waiting for weights that will never come are called off
            await roles.queue.close.remote()
            await asyncio.gather(*producers, return_exceptions=True)
        if restore_from is None:
            break
        tasks = await restore_lost_trainer(roles, cfg, env, restore_from, stats, monitor)
    if cfg.trainer.save_final:
        stats.checkpoint = await save_checkpoint(roles, cfg, stats, "final")
    stats.queue = await roles.queue.metrics.remote()
    stats.stage_intervals.update(await roles.queue.stage_intervals.remote())
    write_stage_intervals(cfg.run_dir, stats.stage_intervals)
    stats.published = await roles.weights.info.remote()
    ledger = await roles.actor.ledger.remote()
    await roles.queue.check_accounting.remote(ledger["trained_count"])
    return stats
