"""Setting a run up: Ray, the model directory, the role deployments, the queue and weight store."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from omegaconf import DictConfig, OmegaConf
from ray import serve

from relaxrl.groups import groups_per_request
from relaxrl.queue import QueueActor
from relaxrl.services.common import keep_off_cpus
from relaxrl.weights import WeightStore, store_name

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """A config node as plain Python (dicts/lists), safe to send to Ray workers."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def init_ray(cfg: DictConfig) -> None:
    """Join ``ray.address`` or start a local Ray bound to 127.0.0.1; Serve's proxy (off by default) too."""
    if not ray.is_initialized():
        # Local runs need no auth token; a cluster keeps whatever its operator configured.
        if cfg.ray.address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ["RAY_worker_niceness"] = str(cfg.ray.worker_niceness)  # the raylet starts the workers
        ray.init(
            address=cfg.ray.address,
            num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
            namespace=cfg.ray.namespace,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.host,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
    # Roles talk through handles only; the HTTP proxy is off unless asked for (and then loopback).
    serve.start(proxy_location=cfg.ray.serve_proxy,
                http_options={"host": cfg.ray.host, "port": cfg.ray.http_port},
                logging_config={"log_level": "WARNING"})
    # In this process too (serve.start sets it up at INFO): "Application ... is ready" per role,
    # "Deleting app" per role; the driver prints its own start-up phases instead.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def reserved_cpus(cfg: DictConfig) -> list[int]:
    """CPUs the driver and every role but the trainer keep off: ``trainer.cpus``, when generation
    overlaps training (``max_staleness >= 1``). A synchronous run's stages take turns, so there the
    trainer is pinned but its CPUs stay open to the others while it waits: reserving them measured
    28 vs 8 ms per step for the rollout's weight load, on the synchronous critical path."""
    return list(cfg.trainer.cpus) if cfg.rollout.max_staleness > 0 else []


def prepare_model_dir(cfg: DictConfig) -> str:
    """The local directory every role loads from (``from_pretrained``); tiny models are built once."""
    m = cfg.model
    if m.source == "local":
        from relaxrl.models.loading import load_tokenizer

        if not m.path:
            raise ValueError("model.source=local needs model.path (a local directory)")
        load_tokenizer(m.path)  # fails early and clearly if the directory is wrong
        return os.path.abspath(os.path.expanduser(m.path))
    if m.source != "tiny":
        raise ValueError(f"model.source must be 'tiny' or 'local', got {m.source!r}")
    from relaxrl.config_check import prompt_template_of
    from relaxrl.envs.registry import make_env
    from relaxrl.models.loading import prepare_tiny_model_dir

    env = make_env(**plain(cfg.env))
    pairs_fn = getattr(env, "sft_pairs", None)
    return prepare_tiny_model_dir(
        cache_dir=os.path.expanduser(m.cache_dir),
        model_kwargs=plain(m.tiny),
        warm_start_pairs_fn=(lambda n: pairs_fn(n, seed=m.warm_start.seed)) if pairs_fn else None,
        warm_start=plain(m.warm_start),
        key_extra={"env": plain(cfg.env)},
        prompt_template=prompt_template_of(cfg),
    )


def prepare_teacher_dir(cfg: DictConfig) -> Optional[str]:
    """The "teacher" checkpoint's directory: None, a local dir, or "tiny" (built from env.teacher_pairs)."""
    t = cfg.teacher
    if not t.teacher_checkpoint:
        return None
    if t.teacher_checkpoint != "tiny":
        from relaxrl.models.loading import load_tokenizer

        load_tokenizer(t.teacher_checkpoint)  # fails early and clearly if the directory is wrong
        return os.path.abspath(os.path.expanduser(t.teacher_checkpoint))
    from relaxrl.config_check import prompt_template_of
    from relaxrl.envs.registry import make_env
    from relaxrl.models.loading import prepare_tiny_model_dir

    env = make_env(**plain(cfg.env))
    if not hasattr(env, "teacher_pairs"):
        raise ValueError(f"teacher.teacher_checkpoint=tiny needs an env with teacher_pairs; {cfg.env.name!r} has none")
    ws = plain(t.teacher_warm_start)
    return prepare_tiny_model_dir(
        cache_dir=os.path.expanduser(cfg.model.cache_dir),
        model_kwargs=plain(cfg.model.tiny),
        warm_start_pairs_fn=lambda n: env.teacher_pairs(n, seed=ws["seed"]),
        warm_start=ws,
        key_extra={"env": plain(cfg.env), "role": "teacher"},
        prompt_template=prompt_template_of(cfg),
    )


def teacher_calls(cfg: DictConfig, required_fields: tuple[str, ...]) -> list[tuple[str, str]]:
    """(checkpoint name, sample field) pairs the teacher role fills for each group, in order."""
    calls = [("ref", "ref_logprobs")]
    if "teacher_logprobs" in required_fields:
        if not cfg.teacher.teacher_checkpoint:
            raise ValueError("the algorithm needs teacher_logprobs: set teacher.teacher_checkpoint (a local model "
                             "dir, or tiny), or teacher.domains={domain: checkpoint dir} for per-domain teachers "
                             "(a pipeline stage with `teachers` sets it from the checkpoint registry)")
        calls.append(("teacher", "teacher_logprobs"))
    return calls


@dataclass
class Roles:
    run_id: str
    rollout: Any  # DeploymentHandle (an EpisodeRollout in a multi-turn run)
    reward: Optional[Any]  # None in a multi-turn run: the env's steps give the reward
    actor: Any
    teacher: Optional[Any]
    queue: Any  # ActorHandle of QueueActor
    weights: Any  # ActorHandle of WeightStore
    model_dir: str = ""  # what the roles loaded (a checkpoint records its architecture)
    teacher_by_domain: bool = False  # the teacher is a DomainTeacher: route each group by its domain
    teacher_calls: list = field(default_factory=lambda: [("ref", "ref_logprobs")])  # see teacher_calls()
    extra_actors: list = field(default_factory=list)  # e.g. the broadcast weight-sync coordinator
    namespace: str = "relaxrl"  # of the named queue and weight store

    def app(self, role: str) -> str:
        """The Serve application of ``role`` in this run (roles call each other by it)."""
        return f"{role}-{self.run_id}"

    @property
    def queue_name(self) -> str:
        return queue_name(self.run_id)

    def app_names(self) -> list[str]:
        roles = (["rollout"] + (["reward"] if self.reward is not None else []) + ["actor"]
                 + (["teacher"] if self.teacher is not None else []))
        return [self.app(r) for r in roles]

    def shutdown(self) -> None:
        """Delete this run's Serve apps (all at once) and its queue and weight store."""
        names = self.app_names()
        for name in names:
            try:
                serve.delete(name, _blocking=False)
            except Exception as e:  # best effort: Serve may already be gone
                log.warning("could not delete Serve app %s: %s", name, e)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(names) & set(serve.status().applications):
            time.sleep(0.2)
        for handle in (self.queue, self.weights, *self.extra_actors):
            ray.kill(handle)


def queue_name(run_id: str) -> str:
    return f"relaxrl-queue-{run_id}"


def describe_roles(cfg: DictConfig, required_fields: tuple[str, ...], multi_turn: bool = False) -> str:
    """The roles a run starts, for the console: e.g. "rollout x1 (hf), reward x1, actor (torch)"."""
    r, tr = cfg.rollout, cfg.trainer
    parts = ([f"episode rollout x{r.num_replicas} (hf)"] if multi_turn else
             [f"rollout x{r.num_replicas} ({r.engine})", f"reward x{cfg.reward.num_replicas}"])
    parts.append(f"actor ({tr.engine}" + (f", {tr.num_ranks} ranks)" if tr.num_ranks > 1 else ")"))
    if needs_teacher(cfg, required_fields) or episode_teacher(cfg) == "checkpoint":
        parts.append(f"teacher x{cfg.teacher.num_replicas}")
    return ", ".join(parts)


def needs_teacher(cfg: DictConfig, required_fields: tuple[str, ...]) -> bool:
    return (bool(cfg.teacher.enabled) or bool(cfg.teacher.domains)
            or any(f in required_fields for f in ("ref_logprobs", "teacher_logprobs")))


def episode_teacher(cfg: DictConfig) -> str:
    """Who labels a multi-turn run's states: DAgger's ``algorithm.teacher``; nobody otherwise."""
    return str(cfg.algorithm.teacher) if cfg.algorithm.name == "dagger" else "none"


def trainer_temperature(cfg: DictConfig) -> float:
    """The temperature the trainer takes log-probs at: the algorithm's own when it names one
    (DAgger's cross-entropy on labels: T=1), else the rollout's."""
    from relaxrl.algorithms import make_algorithm

    algorithm = make_algorithm(plain(cfg.algorithm))
    named = getattr(algorithm, "logprob_temperature", None)
    return float(named(cfg.rollout.temperature)) if named else float(cfg.rollout.temperature)


def start_roles(cfg: DictConfig, model_dir: str, required_fields: tuple[str, ...], multi_turn: bool = False) -> Roles:
    """Deploy rollout, reward, actor (and teacher when needed) as separate Serve applications.

    ``multi_turn``: the rollout is the episode rollout (whole episodes, token-in/token-out) and
    there is no reward role (the env's steps reward the episode); the rest is the same."""
    from relaxrl.faults import replica_options
    from relaxrl.services.actor import Actor
    from relaxrl.services.broadcast_sync import SyncCoordinator, sync_settings
    from relaxrl.services.reward import Reward
    from relaxrl.services.rollout import Rollout
    from relaxrl.services.placement import rollout_options, trainer_options
    from relaxrl.services.teacher import Teacher

    run_id = uuid.uuid4().hex[:8]
    ns = cfg.ray.namespace
    store = ray.remote(WeightStore).options(name=store_name(run_id), namespace=ns, num_cpus=0).remote()
    queue = (
        ray.remote(QueueActor)
        .options(name=queue_name(run_id), namespace=ns, num_cpus=0, max_concurrency=1000)  # named: roles put into it
        .remote(
            groups_per_step=cfg.rollout.groups_per_step,
            group_size=cfg.rollout.group_size,
            max_staleness=cfg.rollout.max_staleness,
            required_fields=required_fields,
            admit_ahead=cfg.rollout.admit_ahead_steps,
            total_groups=cfg.trainer.steps * cfg.rollout.groups_per_step,
        )
    )
    lora = plain(cfg.model.lora) if cfg.model.lora.enabled else None
    r, rw, t, tr, f = cfg.rollout, cfg.reward, cfg.teacher, cfg.trainer, cfg.faults
    avoid = reserved_cpus(cfg)  # every role but the trainer, and the queue and store, keep off them
    if avoid:
        for helper in (store, queue):
            helper.__ray_call__.remote(lambda self, cpus: keep_off_cpus(cpus), avoid)
    sync = sync_settings(cfg, run_id)
    extra = []
    if sync is not None:
        extra.append(ray.remote(SyncCoordinator).options(name=sync["coordinator"], namespace=ns, num_cpus=0)
                     .remote(sync["world_size"]))
    # Serve restarts a replica whose check_health fails: a dead one, or one hung past hang_timeout_s.
    health = replica_options(f)  # health checks, and a short drain at the run's end
    apps = {} if multi_turn else {
        "rollout": Rollout.options(num_replicas=r.num_replicas, **rollout_options(r), **health).bind(
            model_dir,
            sampling={"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens},
            lora=lora,
            dtype=cfg.model.dtype,
            torch_threads=r.torch_threads,
            store_name=store_name(run_id),
            namespace=ns,
            batch_max_groups=r.batch_max_groups,
            groups_per_request=groups_per_request(r.groups_per_request, r.batch_max_groups, r.groups_per_step,
                                                  r.num_replicas),
            batch_wait_s=r.batch_wait_s,
            engine=r.engine,
            vllm=plain(r.vllm),
            seed=cfg.seed,
            streaming=r.streaming,
            partial=r.partial,
            record_partials=cfg.trainer.checkpoint_every > 0,  # what a checkpoint in the run would keep
            stream_chunk_tokens=r.stream_chunk_tokens,
            max_staleness=r.max_staleness,
            weight_sync=sync,
            hang_timeout_s=f.hang_timeout_s,
            sync_timeout_s=f.sync_timeout_s,
            avoid_cpus=avoid,
        ),
        "reward": Reward.options(
            num_replicas=rw.num_replicas, ray_actor_options={"num_cpus": rw.num_cpus}, **health
        ).bind(
            plain(cfg.env), timeout_s=rw.timeout_s, max_workers=rw.max_workers,
            on_error=rw.on_error, error_reward=rw.error_reward, simulated_latency_s=rw.simulated_latency_s,
            hang_timeout_s=f.hang_timeout_s, avoid_cpus=avoid,
        ),
    }
    if multi_turn:
        from relaxrl.config_check import prompt_template_of
        from relaxrl.services.episode_rollout import EpisodeRollout

        teacher_kind = episode_teacher(cfg)
        apps["rollout"] = EpisodeRollout.options(num_replicas=r.num_replicas, **rollout_options(r), **health).bind(
            model_dir, env=plain(cfg.env), sampling={"temperature": r.temperature, "top_p": r.top_p},
            teacher=teacher_kind, teacher_app=f"teacher-{run_id}" if teacher_kind == "checkpoint" else None,
            dtype=cfg.model.dtype, torch_threads=r.torch_threads, store_name=store_name(run_id), namespace=ns,
            seed=cfg.seed, prompt_template=prompt_template_of(cfg), avoid_cpus=avoid,
        )
    apps.update({
        "actor": Actor.options(num_replicas=1, **trainer_options(tr), **health).bind(
            model_dir,
            algorithm=plain(cfg.algorithm),
            trainer=plain(tr),
            lora=lora,
            dtype=cfg.model.dtype,
            train_dtype=cfg.model.train_dtype,
            temperature=trainer_temperature(cfg),
            seed=cfg.seed,
            store_name=store_name(run_id),
            queue_name=queue_name(run_id),
            namespace=ns,
            weight_sync=sync,
            hang_timeout_s=f.hang_timeout_s,
            publish_timeout_s=f.publish_timeout_s,
            weight_bucket_mb=cfg.weight_sync.bucket_mb,
        ),
    })
    calls: list[tuple[str, str]] = []
    if t.domains:
        from relaxrl.services.domain_teacher import DomainTeacher

        apps["teacher"] = DomainTeacher.options(
            num_replicas=t.num_replicas, ray_actor_options={"num_cpus": t.num_cpus, "num_gpus": t.num_gpus},
            **health,
        ).bind(plain(t.domains), dtype=cfg.model.dtype, torch_threads=t.torch_threads, top_k=t.top_k,
               temperature=r.temperature, avoid_cpus=avoid)
    elif needs_teacher(cfg, required_fields):
        calls = teacher_calls(cfg, required_fields)
        checkpoints = {"ref": t.checkpoint or model_dir}
        if ("teacher", "teacher_logprobs") in calls:
            checkpoints["teacher"] = prepare_teacher_dir(cfg)
        apps["teacher"] = Teacher.options(
            num_replicas=t.num_replicas, ray_actor_options={"num_cpus": t.num_cpus, "num_gpus": t.num_gpus},
            **health,
        ).bind(checkpoints, temperature=r.temperature, dtype=cfg.model.dtype, torch_threads=t.torch_threads,
               top_k=t.top_k, hang_timeout_s=f.hang_timeout_s, avoid_cpus=avoid)
    elif multi_turn and episode_teacher(cfg) == "checkpoint":  # DAgger's labels: Teacher.act per turn
        apps["teacher"] = Teacher.options(
            num_replicas=t.num_replicas, ray_actor_options={"num_cpus": t.num_cpus, "num_gpus": t.num_gpus},
            **health,
        ).bind({"teacher": cfg.algorithm.teacher_checkpoint}, temperature=r.temperature, dtype=cfg.model.dtype,
               torch_threads=t.torch_threads, hang_timeout_s=f.hang_timeout_s, avoid_cpus=avoid)
        apps = {"teacher": apps.pop("teacher"), **apps}  # first: the episode rollout looks its app up
    routes: dict[str, str] = {}
    if cfg.get("agent") is not None and cfg.agent.target:  # agent code behind the OpenAI endpoint: it is the rollout
        from relaxrl.services.agent_rollout import agent_rollout_app, route_prefix

        apps["rollout"] = agent_rollout_app(cfg, model_dir, run_id, apps["rollout"])
        routes["rollout"] = route_prefix(run_id)  # its HTTP route on Serve's proxy (ray.host: 127.0.0.1)
    names = list(apps)
    handles = serve.run_many(
        [serve.RunTarget(target=app, name=f"{n}-{run_id}", route_prefix=routes.get(n)) for n, app in apps.items()]
    )
    h = dict(zip(names, handles))
    return Roles(run_id, h["rollout"], h.get("reward"), h["actor"], h.get("teacher"), queue, store, model_dir,
                 extra_actors=extra, teacher_by_domain=bool(t.domains), teacher_calls=calls, namespace=ns)
