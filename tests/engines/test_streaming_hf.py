"""The streaming HF engine (chunked generation): requests that run on their own and a weight update
that lands between chunks while requests are in flight (fp32, tiny model, seconds)."""

from __future__ import annotations

import threading
import time

import pytest

from relaxrl.engines.base import SamplingParams
from relaxrl.engines.hf_generation import HFGenerationEngine, StreamingHFEngine
from relaxrl.engines.payload import pack_weights

from .contract.conftest import base_model, other_model, prompts, tokenizer  # noqa: F401 (fixtures)
from .contract.helpers import TOL, max_diff, reference_logprobs


@pytest.fixture
def engine(base_model, tokenizer):
    import copy

    e = StreamingHFEngine(HFGenerationEngine(copy.deepcopy(base_model), tokenizer), chunk_tokens=4)
    yield e
    e.close()


def test_same_logprobs_as_the_model_across_chunks(engine, base_model, prompts):
    gens = engine.generate(prompts[:6], SamplingParams(temperature=0.7, max_new_tokens=10, seed=2))
    assert engine.chunks >= 2  # 10 tokens in chunks of 4: responses continued across chunk boundaries
    assert all(len(g.logprobs) == len(g.response_ids) == len(g.token_versions) > 0 for g in gens)
    assert all(g.finish_reason == "stop" or len(g.response_ids) == 10 for g in gens)
    assert max_diff(gens, reference_logprobs(base_model, prompts[:6], gens, 0.7)) < TOL


def test_short_request_returns_before_a_long_one(engine, prompts):
    done: dict[str, float] = {}

    def run(name, n):
        engine.generate([prompts[1]], SamplingParams(temperature=1.0, max_new_tokens=n, seed=1))
        done[name] = time.perf_counter()

    long = threading.Thread(target=run, args=("long", 48))
    long.start()
    while engine.tokens_streamed < 4 and long.is_alive():
        time.sleep(0.001)
    run("short", 3)
    long.join()
    assert done["short"] < done["long"]


def test_weight_update_between_chunks_scores_later_tokens_with_new_weights(engine, base_model, other_model, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=4)
    futures = engine.submit(prompts[:4], params)
    while engine.tokens_streamed < 4 * 4:  # the first chunk is out
        time.sleep(0.001)
    engine.load_weights(pack_weights(other_model.state_dict(), version=1, kind="full"))
    gens = [f.result() for f in futures]
    assert engine.version == 1
    mixed = [g for g in gens if set(g.token_versions) == {0, 1}]
    assert mixed, [g.token_versions for g in gens]
    old = reference_logprobs(base_model, prompts[:4], gens, 1.0)
    new = reference_logprobs(other_model, prompts[:4], gens, 1.0)
    own = [[(n if v else o) for o, n, v in zip(ro, rn, g.token_versions)] for ro, rn, g in zip(old, new, gens)]
    diff = max(abs(a - b) for g, r in zip(gens, own) for a, b in zip(g.logprobs, r))
    moved = max(abs(a - o) for g, ro in zip(gens, old) for a, o, v in zip(g.logprobs, ro, g.token_versions) if v)
    print(f"HF chunked: {len(mixed)}/4 span the update, max |logp - own version| = {diff:.2e}, vs old {moved:.2f}")
    assert diff < TOL and moved > 0.1
