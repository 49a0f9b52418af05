import json
import os

import pytest
import torch

from relaxrl.envs.arithmetic import ArithmeticEnv
from relaxrl.models import loading
from relaxrl.models.loading import load_model, load_tokenizer, prepare_tiny_model_dir
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from relaxrl.models.warm_start import encode_pair, pad_batch, warm_start


def test_encode_pair_masks_the_prompt():
    tok = build_tokenizer()
    ids, labels = encode_pair(tok, "3+4=", "7")
    assert tok.convert_ids_to_tokens(ids) == ["<|user|>", "3", "+", "4", "=", "<|assistant|>", "7", "<eos>"]
    assert labels == [-100] * 6 + [tok.convert_tokens_to_ids("7"), tok.eos_token_id]
    ids_, mask, lab = pad_batch([(ids, labels), ([5, 6], [-100, 6])], pad_id=0)
    assert ids_[1].tolist() == [5, 6] + [0] * 6 and mask[1].tolist() == [1, 1] + [0] * 6
    assert lab[1].tolist() == [-100, 6] + [-100] * 6


def test_warm_start_lowers_loss_and_is_deterministic():
    tok = build_tokenizer()
    pairs = ArithmeticEnv().sft_pairs(400, seed=0)
    runs = []
    for _ in range(2):
        model = build_tiny_model(tok, seed=0)
        metrics = warm_start(model, tok, pairs, steps=40, lr=3e-3, batch_size=16, seed=0)
        runs.append((metrics, model.state_dict()["model.embed_tokens.weight"].clone()))
    (m, w), (m2, w2) = runs
    assert m["steps"] == 40
    assert m["final_loss"] < 0.5 * m["initial_loss"]
    assert m == m2 and torch.equal(w, w2)


def _pairs_fn(calls):
    def fn(n):
        calls.append(n)
        return ArithmeticEnv().sft_pairs(n, seed=0)

    return fn


def test_prepare_tiny_model_dir_builds_caches_and_keys(tmp_path):
    calls: list[int] = []
    ws = {"steps": 5, "lr": 3e-3, "batch_size": 8, "seed": 0}
    kwargs = {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}
    first = prepare_tiny_model_dir(
        cache_dir=str(tmp_path), model_kwargs=kwargs, warm_start_pairs_fn=_pairs_fn(calls), warm_start=ws, key_extra={"env": "a"}
    )
    assert calls == [40]  # steps * batch_size pairs
    marker = json.loads((tmp_path / os.path.basename(first) / loading.MARKER).read_text())
    assert marker["metrics"]["steps"] == 5 and marker["metrics"]["final_loss"] > 0
    mtime = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns

    again = prepare_tiny_model_dir(
        cache_dir=str(tmp_path), model_kwargs=kwargs, warm_start_pairs_fn=_pairs_fn(calls), warm_start=ws, key_extra={"env": "a"}
    )
    assert again == first and calls == [40]  # reused, not rebuilt
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == mtime

    other = prepare_tiny_model_dir(
        cache_dir=str(tmp_path), model_kwargs=kwargs, warm_start_pairs_fn=_pairs_fn(calls), warm_start=ws, key_extra={"env": "b"}
    )
    assert other != first and calls == [40, 40]
    # Only finished directories are left behind: no temp dirs.
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(first), os.path.basename(other)])

    model, tok = load_model(first), load_tokenizer(first)
    assert model.config.hidden_size == 64 and tok.decode(tok("7+8=")["input_ids"]) == "7+8="


def test_prepare_without_warm_start_matches_fresh_model(tmp_path):
    path = prepare_tiny_model_dir(
        cache_dir=str(tmp_path), model_kwargs={"seed": 2}, warm_start_pairs_fn=None, warm_start={"steps": 0}, key_extra={}
    )
    fresh = build_tiny_model(build_tokenizer(), seed=2)
    loaded = load_model(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_prepare_rejects_unknown_warm_start_keys(tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        prepare_tiny_model_dir(
            cache_dir=str(tmp_path), model_kwargs={}, warm_start_pairs_fn=None, warm_start={"stepz": 1}, key_extra={}
        )


def test_prepare_lost_race_keeps_the_winners_directory(tmp_path, monkeypatch):
    real_build = loading.build_tiny_model
    key = loading.cache_key({}, dict(loading.WARM_START_DEFAULTS), {})

    def build_while_another_process_finishes(tok, **kw):
        winner = tmp_path / key
        winner.mkdir()
        (winner / loading.MARKER).write_text(json.dumps({"metrics": {"winner": True}}))
        return real_build(tok, **kw)

    monkeypatch.setattr(loading, "build_tiny_model", build_while_another_process_finishes)
    path = prepare_tiny_model_dir(
        cache_dir=str(tmp_path), model_kwargs={}, warm_start_pairs_fn=None, warm_start={}, key_extra={}
    )
    assert path == str(tmp_path / key)
    assert json.loads((tmp_path / key / loading.MARKER).read_text())["metrics"] == {"winner": True}
    assert os.listdir(tmp_path) == [key]  # our temp directory was cleaned up


def _answer_nll(model, tok, pairs, template):
    """Mean NLL of the answers (+ EOS) with prompts rendered by ``template`` (None: the chat template)."""
    from relaxrl.models.warm_start import sft_loss

    ids, mask, labels = pad_batch([encode_pair(tok, p, a, template) for p, a in pairs], tok.pad_token_id)
    with torch.no_grad():
        return float(sft_loss(model, ids, mask, labels))


def test_warm_start_renders_prompts_with_env_prompt_template(tmp_path):
    """env.prompt_template is what RL renders prompts with: the warm start must train on it too (it
    used the chat template whatever the env said, so RL began from a model taught another prompt)."""
    from relaxrl.launch import prepare_model_dir
    from tests.integration.helpers import make_cfg

    pairs = ArithmeticEnv().sft_pairs(64, seed=0)
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    template = "Q: {prompt}\nA:"
    cfg = make_cfg(tmp_path / "run", tmp_path / "cache", "env=dataset", f"env.path={data}",
                   f"env.prompt_template='{template}'", "model.warm_start.steps=60",
                   "model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
                   "model.tiny.intermediate_size=128")
    path = prepare_model_dir(cfg)
    marker = json.loads((tmp_path / "cache" / os.path.basename(path) / loading.MARKER).read_text())
    model, tok = load_model(path), load_tokenizer(path)
    with_template, with_chat = _answer_nll(model, tok, pairs, template), _answer_nll(model, tok, pairs, None)
    assert with_template < 0.7 * with_chat, (with_template, with_chat)
    print(f"answer NLL: {with_template:.3f} under the template, {with_chat:.3f} under the chat template")
    assert marker["metrics"]["prompt"] == template
    assert encode_pair(tok, "3+4=", "7", template)[0][:len(tok("Q: 3+4=\nA:")["input_ids"])] == \
        tok("Q: 3+4=\nA:")["input_ids"]
