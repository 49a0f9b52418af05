"""Typed configuration, registered with Hydra's ConfigStore.

Every node is a dataclass, so a misspelled key or a wrong type is an error that names it. The
YAML files under ``relaxrl/conf`` select and fill these schemas; ``relaxrl/conf/config.yaml`` is the
root. Polymorphic groups (``algorithm``, ``env``) store one schema per option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from relaxrl.algorithms.extrapolated_opd import ExtrapolatedOPDConfig
from relaxrl.algorithms.grpo import GRPOConfig
from relaxrl.algorithms.mopd import MOPDConfig
from relaxrl.engines.options import DeepSpeedOptions, VLLMOptions, WeightSyncOptions
from relaxrl.envs.json_answer import JsonAnswerEnvConfig
from relaxrl.envs.mixture import MixtureEnvConfig
from relaxrl.envs.plugins import CustomEnvConfig
from relaxrl.envs.agent import AgentConfig
from relaxrl.faults import FaultConfig
from relaxrl.models.lora import LoraConfig
from relaxrl.pipeline.config import PipelineConfig


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray; "auto" or "ray://host:10001" joins a cluster
    num_cpus: Optional[int] = None  # CPUs of the local Ray (ignored when joining a cluster)
    namespace: str = "relaxrl"
    host: str = "127.0.0.1"  # bind address of the local Ray dashboard and Serve's HTTP proxy
    include_dashboard: bool = False
    serve_proxy: str = "Disabled"  # Serve HTTP proxy: Disabled | HeadOnly | EveryNode (no role has a route)
    http_port: int = 8000
    # Scheduling priority of a local Ray's workers, i.e. every role (Ray's own default is 15). The
    # roles are the run's work: at 15 the driver and Ray's own processes (nice 0) preempt them, which
    # measured 339 vs 296 ms per synchronous quickstart step on 2 cores. A cluster keeps what
    # `ray start` was given (RAY_worker_niceness=0 ray start ... to match).
    worker_niceness: int = 0


@dataclass
class TinyModelConfig:
    arch: str = "qwen2"  # qwen2 | llama
    hidden_size: int = 128  # head dim = hidden/heads must be >= 32 (vLLM CPU attention accepts it)
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    seed: int = 0


@dataclass
class WarmStartConfig:
    steps: int = 0  # supervised steps on the env's solutions before RL (0: none)
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0


@dataclass
class ModelConfig:
    source: str = "tiny"  # tiny: built offline from `tiny`; local: `path` holds a saved HF model
    path: Optional[str] = None  # local directory with config.json + tokenizer (never downloaded)
    dtype: str = "auto"  # auto: the directory's own (config.json); float32 | bfloat16 | float16
    # What the torch trainer keeps its weights and AdamW state in: float32 (fp32 master weights,
    # forward/backward under autocast in `dtype`; exports and checkpoints in `dtype`) or `dtype` itself.
    train_dtype: str = "float32"
    cache_dir: str = "~/.cache/relaxrl/models"  # where built tiny models are cached, keyed by config
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ArithmeticEnvConfig:
    name: str = "arithmetic"
    ops: list[str] = field(default_factory=lambda: ["+"])
    min_operand: int = 0
    max_operand: int = 9
    eval_size: int = 64
    domain: str = "arithmetic"


@dataclass
class DatasetEnvConfig:
    name: str = "dataset"
    path: str = MISSING  # local .jsonl / .json / .parquet file
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    domain_field: Optional[str] = None
    domain: str = "default"
    # exact | numeric | contains | python_tests (runs code in a sandboxed subprocess) | math (final answer,
    # symbolic) | format | a @register_verifier name | an import path "my_module:my_reward"
    verifier: str = "exact"
    eval_fraction: float = 0.1
    on_bad_row: str = "error"  # a malformed row (missing field, wrong type): error naming it | skip (counted, logged)
    # Reward = weighted sum of components: correct (= verifier) or any verifier name, e.g.
    # {correct: 1.0, format: 0.1}. Empty: {correct: 1.0}.
    reward_weights: dict[str, float] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)  # user modules imported first (@register_verifier)
    prompt_template: Optional[str] = None  # e.g. "Question: {prompt}\nAnswer:"; None: the chat template


@dataclass
class RolloutConfig:
    max_staleness: int = 1  # trained version - generating version never exceeds this; 0 = synchronous
    group_size: int = 8  # responses per prompt (one GRPO group)
    groups_per_step: int = 4  # prompt groups per optimizer step
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    # Steps of groups admitted past the staleness bound, sent to the rollout early: each waits there
    # for the weights it needs and starts when they are published (no driver round trip). 0 = off.
    # Off by default for now: a resumed run hung once with it on (see docs/design.md).
    admit_ahead_steps: int = 0
    # Groups in flight at once; 0 = groups_per_step * (max_staleness + 1 + admit_ahead_steps).
    max_inflight_groups: int = 0
    # Groups per driver request (admitted, generated, rewarded and queued together: one call each
    # per request, not per group). 0 = min(batch_max_groups, ceil(groups_per_step / num_replicas)).
    groups_per_request: int = 0
    num_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1
    batch_max_groups: int = 8  # at most this many groups in one generate call (Serve request batching)
    batch_wait_s: float = 0.005
    engine: str = "hf"  # hf (transformers, embedded default) | vllm (production; see docs/engines.md)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)  # used when engine=vllm
    # Each request streams on its own (continuous batching) and weights load in flight, between
    # engine steps (docs/engines.md). Off: Serve batches requests into one generate call each.
    streaming: bool = False
    # streaming: hf: tokens per chunk (weights change between chunks); vllm: the tokens a partial rollout
    # record grows by at a time (what a checkpoint keeps of a response in flight)
    stream_chunk_tokens: int = 16
    # A weight update landing on a streaming generation (relaxrl/partial.py): continue (its tokens keep
    # their versions; aborted only past its staleness deadline) or abort (generated again from its
    # prompt under the new weights). continue is the default: abort rejects exactly the generations
    # that span an update, so long responses more often (a length bias, tests/reliability).
    partial: str = "continue"


@dataclass
class RewardConfig:
    num_replicas: int = 1
    num_cpus: float = 0.1
    timeout_s: float = 10.0  # a verifier call slower than this counts as a timeout
    max_workers: int = 8  # verifier threads per replica
    on_error: str = "drop"  # drop: the group is dropped and counted; zero: reward = error_reward
    error_reward: float = 0.0
    simulated_latency_s: float = 0.0  # a verifier that waits this long per request (benchmarks)


@dataclass
class TeacherConfig:
    enabled: bool = False  # forced on when the algorithm needs ref/teacher log-probs
    checkpoint: Optional[str] = None  # None: the initial policy (the reference for KL)
    num_replicas: int = 1
    num_cpus: float = 0.2
    num_gpus: float = 0.0
    torch_threads: int = 1
    top_k: int = 0
    # {domain: checkpoint dir}: serve one teacher per domain (DomainTeacher); each sample is scored by
    # its own domain's teacher into teacher_logprobs (MOPD). Pipeline stages fill it from the registry.
    domains: dict[str, str] = field(default_factory=dict)
    # Served as "teacher" (fills teacher_logprobs) when the algorithm needs it; "ref" stays the base.
    # A local model dir, or "tiny": built offline by warm-starting on the env's teacher_pairs.
    teacher_checkpoint: Optional[str] = None
    teacher_warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)  # for teacher_checkpoint=tiny


@dataclass
class TrainerConfig:
    steps: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    micro_batch_size: int = 32  # rows per micro-batch (gradient accumulation)
    # > 0: micro-batches hold rows of similar length, at most this many padded token slots each
    # (rows x widest), cut to their own widest row: padding is not paid for. 0: consecutive rows.
    max_tokens_per_micro_batch: int = 0
    mini_batches: int = 1  # PPO mini-batches: optimizer updates per step, each on whole groups
    ppo_epochs: int = 1  # passes over a step's mini-batches; the weight version goes up once per step
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    # Pin the trainer replica to these CPU ids and, when generation overlaps training
    # (max_staleness >= 1), keep the driver and the other roles off them (one machine: a trainer
    # sharing its cores with generation runs slower). Empty: no pinning.
    cpus: list[int] = field(default_factory=list)
    checkpoint_every: int = 0  # steps between checkpoints; 0: only the final one
    # Held-out evaluation (services/evaluator.py): the env's eval split at step 0, every eval_every
    # steps and the last, greedy and sampled at rollout.temperature, logged as eval/*. 0: off.
    eval_every: int = 0
    eval_max_tasks: int = 0  # evaluate the first this many eval tasks; 0: the whole split
    eval_num_gpus: float = 0.0  # the evaluator replica's GPUs
    save_final: bool = True
    get_batch_timeout_s: float = 600.0  # fail loudly instead of waiting forever for data
    engine: str = "torch"  # torch (embedded default) | deepspeed (production; see docs/engines.md)
    num_ranks: int = 1  # data-parallel trainer ranks, one placement-group bundle (num_gpus each) per rank
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)  # used when engine=deepspeed


@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb (console output and metrics.jsonl are always written)
    progress: bool = True  # tqdm progress bar
    project: str = "relaxrl"
    entity: Optional[str] = None
    mode: Optional[str] = None  # wandb mode; None: WANDB_MODE from the environment, else online
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 0
    run_dir: str = "${hydra:runtime.output_dir}"
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: Any = MISSING
    algorithm: Any = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # stages; empty: a single run
    weight_sync: WeightSyncOptions = field(default_factory=WeightSyncOptions)  # trainer -> rollout weights
    faults: FaultConfig = field(default_factory=FaultConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)  # agent code behind an OpenAI endpoint; off by default
    resume: Optional[str] = None  # true: newest checkpoint of run_dir; or a checkpoint / run directory path


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="algorithm", name="grpo_schema", node=GRPOConfig)
    cs.store(group="env", name="arithmetic_schema", node=ArithmeticEnvConfig)
    cs.store(group="env", name="dataset_schema", node=DatasetEnvConfig)
    cs.store(group="algorithm", name="mopd_schema", node=MOPDConfig)
    cs.store(group="env", name="mixture_schema", node=MixtureEnvConfig)
    cs.store(group="algorithm", name="extrapolated_opd_schema", node=ExtrapolatedOPDConfig)
    cs.store(group="env", name="json_answer_schema", node=JsonAnswerEnvConfig)
    cs.store(group="env", name="custom_schema", node=CustomEnvConfig)


register_configs()

from relaxrl.episodic.config import register_episodic_configs  # noqa: E402  (DAgger, multi-turn envs)

register_episodic_configs()
