"""The embedded engines on a GPU: a role that sees CUDA puts its model there by default, batches
move to it, results come back on the CPU, and bf16 trains on fp32 master weights."""

from __future__ import annotations

import copy

import pytest
import torch

from relaxrl.engines.base import SamplingParams
from relaxrl.engines.hf_generation import HFGenerationEngine
from relaxrl.engines.payload import unpack_weights
from relaxrl.engines.torch_trainer import TorchTrainerEngine
from relaxrl.models.chat import render_prompt_ids
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.sample import Sample, collate

from .conftest import needs

pytestmark = [pytest.mark.gpu, needs(1)]


def test_engines_default_to_the_gpu_and_answer_on_the_cpu():
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0)
    gen = HFGenerationEngine(copy.deepcopy(model), tok)
    assert gen.device.type == "cuda"
    prompts = [render_prompt_ids(tok, f"{i}+1=") for i in range(8)]
    gens = gen.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    samples = [Sample(uid=f"g/{i}", group_id="g", index=i, prompt_ids=p, response_ids=g.response_ids,
                      behaviour_logprobs=g.logprobs) for i, (p, g) in enumerate(zip(prompts, gens))]
    batch = collate(samples, tok.pad_token_id)
    batch.scalars["tokens"] = float(batch.loss_mask.sum())
    trainer = TorchTrainerEngine(copy.deepcopy(model).to(torch.bfloat16), micro_batch_size=4)
    assert trainer.device.type == "cuda" and next(trainer.model.parameters()).dtype == torch.float32
    logp = trainer.logprobs(batch)
    assert logp.device.type == "cpu"
    out = trainer.train_step(batch, lambda lp, mb: (-(lp * mb.loss_mask).sum() / mb.scalars["tokens"], {}))
    assert out["skipped"] == 0.0
    state = unpack_weights(trainer.export_weights())
    assert {t.device.type for t in state.values()} == {"cpu"} and {t.dtype for t in state.values()} == {torch.bfloat16}
    scored = gen.score([p + g.response_ids for p, g in zip(prompts, gens)], [len(p) for p in prompts])
    assert len(scored.logprobs) == len(prompts)
