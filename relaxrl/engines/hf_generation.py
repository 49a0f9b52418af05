"""A plain-PyTorch generation engine on ``transformers``' ``generate`` (CPU smoke runs and tests).

Behaviour log-probs are ``log_softmax(logits / temperature)`` at each sampled token: the
distribution actually sampled from *before* top-p truncation (top-p is not reflected in the
log-prob). The trainer computes the same quantity (``token_logprobs`` with the same temperature),
so on identical weights the importance ratio is exactly 1. Greedy decoding (temperature 0)
reports temperature-1 log-probs.
"""

from __future__ import annotations

import logging
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from relaxrl.engines.base import Generation, SamplingParams, WeightPayload, request_seeds
from relaxrl.engines.device import first_stop, log_model, resolve_device, token_ids
from relaxrl.engines.logprobs import gather_response, left_pad, right_pad, token_logprobs, token_logprobs_topk
from relaxrl.engines.payload import ByteCount, first_part, load_full_parts, merged
from relaxrl.models.lora import LoraConfig, apply_lora, is_lora, load_adapter_state_dict

log = logging.getLogger(__name__)


class Scored(NamedTuple):
    """Per-response-token log-probs of given sequences, with optional top-k alternatives."""

    logprobs: list[list[float]]
    topk_ids: Optional[list[list[list[int]]]] = None
    topk_logprobs: Optional[list[list[list[float]]]] = None


def check_payload_kind(payload: WeightPayload, lora_on: bool) -> None:
    expected = "lora" if lora_on else "full"
    if payload.kind != expected:
        raise ValueError(
            f"weight payload kind {payload.kind!r} does not match this engine, which expects "
            f"{expected!r} (LoRA is {'on' if lora_on else 'off'}); trainer and rollout must share the LoRA setting"
        )


class ChosenLogprobs(LogitsProcessor):
    """Records ``log_softmax(logits / T)`` of each sampled token as generation goes, keeping one
    ``[B, vocab]`` step at a time: step s's token is known at step s + 1 (the last input id), the
    last step's from the returned sequences (``finish``). Asking ``generate`` for every step's
    logits instead holds ``new_tokens x [B, vocab]`` fp32 (16 x 256 tokens at vocab 151,936: 2.5 GB).

    Custom processors run before the sampling warpers (temperature, top-p), so the scores seen
    here are the model's logits: the log-probs are those of the distribution before top-p, as the
    trainer computes them."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self._last: Optional[torch.Tensor] = None  # log-softmax of the step whose token is not yet known
        self._chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self._chosen.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` log-probs of ``new_tokens`` (the generated columns)."""
        if self._last is not None:
            self._chosen.append(self._last.gather(-1, new_tokens[:, -1:].to(self._last.device)).squeeze(-1))
            self._last = None
        if not self._chosen:
            return torch.zeros(new_tokens.shape[0], 0)
        return torch.stack(self._chosen, dim=1)


class HFGenerationEngine:
    """Implements ``GenerationEngine`` (and ``score`` for teacher/reference roles)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        lora: LoraConfig | None = None,
        torch_threads: int | None = 1,
        device: str | None = None,  # None: cuda if this process sees a GPU, else cpu
        role: str = "generation",  # names the engine in its start-up log line
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.tokenizer = tokenizer
        base = model.get_base_model() if is_lora(model) else model
        # Every EOS id of the model's generation config ends a response (Llama-3 has two), then the
        # tokenizer's own; the first is the one padding falls back to when there is no pad token.
        self.eos_ids = token_ids(base.generation_config.eos_token_id, tokenizer.eos_token_id)
        if not self.eos_ids:
            raise ValueError("the model's generation config and its tokenizer name no eos_token_id")
        self.eos_id = self.eos_ids[0]
        # Padding is masked out everywhere, so with no pad token any id serves; EOS is always valid.
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        # Sampling is defined by SamplingParams alone: drop a checkpoint's generation defaults
        # (top_k, repetition_penalty, ...) that the trainer's log-probs would not reflect.
        base.generation_config = GenerationConfig(
            pad_token_id=self.pad_id, eos_token_id=list(self.eos_ids), bos_token_id=base.generation_config.bos_token_id
        )
        if lora is not None and lora.enabled and not is_lora(model):
            model = apply_lora(model, lora)
        self.model = model.to(resolve_device(device)).eval()
        self.lora_on = is_lora(model)
        self.version = 0
        log_model(log, role, self.model, next(self.model.parameters()).dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        lora: LoraConfig | None = None,
        dtype: str = "auto",
        torch_threads: int | None = 1,
        device: str | None = None,
        role: str = "generation",
    ) -> "HFGenerationEngine":
        from relaxrl.models.loading import load_model, load_tokenizer

        return cls(load_model(path, dtype=dtype), load_tokenizer(path), lora=lora, torch_threads=torch_threads,
                   device=device, role=role)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """One response per prompt; the same ``seed``, prompts and weights give the same tokens."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs non-empty prompts")
        ids, mask = left_pad([list(p) for p in prompts], self.pad_id)
        greedy = params.temperature <= 0
        sampling = {} if greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        temperature = params.temperature if not greedy else 1.0
        recorder = ChosenLogprobs(temperature)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=not greedy,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=list(self.eos_ids),
                return_dict_in_generate=True,
                logits_processor=LogitsProcessorList([recorder]),
                **sampling,
            )
            new = out.sequences[:, ids.shape[1] :]
            chosen = recorder.finish(new).cpu()
        new = new.cpu()
        results = []
        for i in range(len(prompts)):
            row = new[i].tolist()
            first = first_stop(row, self.eos_ids)  # generate pads finished rows: cut at the first EOS
            stop = first + 1 if first is not None else None
            n = stop if stop is not None else min(len(row), params.max_new_tokens)
            results.append(
                Generation(
                    response_ids=row[:n],
                    logprobs=chosen[i, :n].tolist(),
                    finish_reason="stop" if stop is not None else "length",
                )
            )
        return results

    def load_weights(self, payload: WeightPayload) -> None:
        """Load a ``"full"`` state dict, or a ``"lora"`` adapter into a LoRA engine; adopt its version."""
        self.load_weight_parts([payload])

    def load_weight_parts(self, parts: Iterable[WeightPayload]) -> None:
        """``load_weights`` for an update in parts: the full weights are copied in place part by part
        (the manifest checked before the first copy); an adapter is loaded whole."""
        first, parts = first_part(parts)
        check_payload_kind(first, self.lora_on)
        if self.lora_on:
            with torch.no_grad():
                load_adapter_state_dict(self.model, merged(parts).tensors)
        else:
            load_full_parts(self.model, parts)
        self.version = int(first.version)

    def score(
        self,
        token_ids: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        top_k: int = 0,
        *,
        temperature: float = 1.0,
        batch_size: int = 16,
    ) -> Scored:
        """Log-probs of each response token (``token_ids[i][prompt_lens[i]:]``) under this model.

        With ``top_k > 0`` also the ids and log-probs of the k likeliest tokens at each response
        position (for distillation).
        """
        lps: list[list[float]] = []
        top_ids: list = []
        top_lps: list = []
        for start in range(0, len(token_ids), batch_size):
            seqs = [list(s) for s in token_ids[start : start + batch_size]]
            plens = list(prompt_lens[start : start + batch_size])
            if any(p < 1 or p > len(s) for p, s in zip(plens, seqs)):
                raise ValueError("each prompt length must be between 1 and its sequence length")
            lengths = [len(s) - p for s, p in zip(seqs, plens)]
            ids, mask = right_pad(seqs, self.pad_id)
            with torch.inference_mode():
                if top_k > 0:
                    chosen, ids_k, lps_k = token_logprobs_topk(self.model, ids, mask, top_k, temperature)
                    top_ids += gather_response(ids_k.cpu(), plens, lengths)
                    top_lps += gather_response(lps_k.cpu(), plens, lengths)
                else:
                    chosen = token_logprobs(self.model, ids, mask, temperature)
            lps += gather_response(chosen.cpu(), plens, lengths)
        return Scored(lps, top_ids if top_k > 0 else None, top_lps if top_k > 0 else None)


class _Job:
    """One request of the streaming HF engine: its response so far and where it goes when done."""

    __slots__ = ("prompt", "params", "ids", "logprobs", "versions", "future", "stopped", "on_tokens")

    def __init__(self, prompt: list[int], params: SamplingParams, future, on_tokens=None) -> None:
        self.prompt = prompt
        self.params = params
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.future = future
        self.stopped = False
        self.on_tokens = on_tokens  # (ids, logprobs, version, finish_reason) after each chunk, or None

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.ids)

    def result(self) -> Generation:
        return Generation(self.ids, self.logprobs, "stop" if self.stopped else "length", list(self.versions))


def _settle(future, result=None, error: Optional[BaseException] = None) -> None:
    """Resolve ``future`` unless its caller cancelled it meanwhile."""
    from concurrent.futures import InvalidStateError

    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled from another thread
        pass


def sampling_key(params: SamplingParams) -> tuple:
    """Requests that may share a generate call: same temperature and top-p."""
    return (float(params.temperature), float(params.top_p))


class StreamingHFEngine:
    """``StreamingGenerationEngine`` on the HF engine by chunked generation (the simple CPU path).

    One thread runs the engine in chunks of ``chunk_tokens`` new tokens over every request in
    flight: a request joins at the next chunk boundary and returns at the first boundary after its
    own response ends, so it never waits for a longer response of another request. Weight updates
    land between chunks. Each chunk prefills its rows again (prompt plus the response so far) rather
    than keep a KV cache, so every token after an update is sampled and scored by the new weights
    alone, with the context recomputed: the behaviour log-probs equal the new policy's exactly.

    transformers' own continuous batching (``generate_batch``) is not used: it exposes neither the
    per-token log-probs before top-p nor a point between steps to change weights.
    """

    def __init__(self, engine: HFGenerationEngine, *, chunk_tokens: int = 16) -> None:
        import queue
        import threading

        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.lora_on = engine.lora_on
        self.chunk_tokens = int(chunk_tokens)
        self.loads = 0
        self.load_bytes = 0
        self.tokens_streamed = 0
        self.chunks = 0
        self._inbox: "queue.Queue" = queue.Queue()  # new jobs, weight payloads, or None (stop)
        self._thread = threading.Thread(target=self._run, daemon=True, name="hf-streaming-engine")
        self._thread.start()

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    # ------------------------------------------------------------------ requests

    # ``on_tokens`` is supported: the rollout keeps partial rollouts from it (relaxrl.partial).
    reports_tokens = True

    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams, on_tokens=None) -> list:
        """One ``concurrent.futures.Future`` of a ``Generation`` per prompt.

        ``on_tokens(index, ids, logprobs, version, finish_reason)``, if given, is called on the
        engine's thread after every chunk with prompt ``index``'s new tokens (``finish_reason`` ""
        until its last chunk): what a checkpoint records of a generation in flight."""
        import functools
        from concurrent.futures import Future

        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs non-empty prompts")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if not self._thread.is_alive():
            raise RuntimeError("the streaming HF engine is closed")
        futures = []
        for i, (p, seed) in enumerate(zip(prompts, request_seeds(params.seed, len(prompts)))):
            f: Future = Future()
            hook = None if on_tokens is None else functools.partial(on_tokens, i)
            self._inbox.put(_Job([int(t) for t in p], SamplingParams(params.temperature, params.top_p,
                                                                      params.max_new_tokens, seed), f, hook))
            futures.append(f)
        return futures

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        return [f.result() for f in self.submit(prompts, params)]

    async def agenerate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        on_tokens=None) -> list[Generation]:
        import asyncio

        futures = self.submit(prompts, params, on_tokens)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    # ------------------------------------------------------------------ weights

    def load_weights(self, payload: WeightPayload) -> None:
        """Load at the next chunk boundary (at once when idle); returns once loaded."""
        self.submit_weights([payload]).result()

    def load_weight_parts(self, parts: Iterable[WeightPayload]) -> None:
        self.submit_weights(parts).result()

    async def aload_weights(self, payload: WeightPayload) -> None:
        await self.aload_weight_parts([payload])

    async def aload_weight_parts(self, parts: Iterable[WeightPayload]) -> None:
        import asyncio

        await asyncio.wrap_future(self.submit_weights(parts))

    def load_state_iterator(self, tensors, version: int) -> None:
        """Full weights as ``(name, tensor)`` pairs (the broadcast receiver's path, which owns them:
        loaded as they are, no copy), at the next chunk."""
        self.load_weights(WeightPayload(int(version), "full", tensors=dict(tensors)))

    def submit_weights(self, parts: Iterable[WeightPayload]):
        """Queue an update (its parts) for the next chunk boundary; the future is set once loaded."""
        from concurrent.futures import Future

        f: Future = Future()
        self._inbox.put((parts, f))
        return f

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        import queue

        active: list[_Job] = []
        while True:
            items = []
            try:  # block only when nothing is in flight
                items.append(self._inbox.get(block=not active))
                while True:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                if item is None:
                    for job in active:
                        _settle(job.future, error=RuntimeError("the streaming HF engine was closed"))
                    return
                if isinstance(item, _Job):
                    active.append(item)
                else:
                    self._load(*item)
            if active:
                active = self._chunk(active)

    def _load(self, parts: Iterable[WeightPayload], future) -> None:
        counted = ByteCount(parts)
        try:
            self.engine.load_weight_parts(counted)
            self.loads += 1
            self.load_bytes += counted.nbytes
            future.set_result(None)
        except BaseException as e:  # the caller sees it; the loop goes on with the old weights
            future.set_exception(e)

    def _chunk(self, active: list[_Job]) -> list[_Job]:
        """``chunk_tokens`` more tokens for every job (one generate call per sampling setting);
        returns the jobs still unfinished."""
        groups: dict[tuple, list[_Job]] = {}
        for job in active:
            if job.future.cancelled():  # the caller gave up on it (an aborted partial rollout)
                continue
            groups.setdefault(sampling_key(job.params), []).append(job)
        left = []
        for jobs in groups.values():
            n = min(self.chunk_tokens, max(j.remaining for j in jobs))
            first = jobs[0].params
            # From the requests' own seeds and progress: the same requests arriving together give
            # the same tokens (which requests share a chunk depends on timing, though).
            seed = None if first.seed is None else (first.seed + 7919 * len(jobs[0].ids)) % (2**63 - 1)
            params = SamplingParams(first.temperature, first.top_p, n, seed)
            version = self.engine.version
            try:
                gens = self.engine.generate([j.prompt + j.ids for j in jobs], params)
            except BaseException as e:
                for j in jobs:
                    _settle(j.future, error=e)
                continue
            for j, g in zip(jobs, gens):
                k = min(len(g.response_ids), j.remaining)
                j.ids += g.response_ids[:k]
                j.logprobs += g.logprobs[:k]
                j.versions += [version] * k
                self.tokens_streamed += k
                j.stopped = g.finish_reason == "stop" and k == len(g.response_ids)
                if j.on_tokens is not None:
                    finish = "stop" if j.stopped else ("length" if j.remaining <= 0 else "")
                    try:
                        j.on_tokens(g.response_ids[:k], g.logprobs[:k], version, finish)
                    except BaseException as e:  # the caller's hook failed: its request fails, not the engine
                        _settle(j.future, error=e)
                        continue
                if j.stopped or j.remaining <= 0:
                    _settle(j.future, j.result())
                else:
                    left.append(j)
        self.chunks += 1
        return left

    def close(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout=30)
