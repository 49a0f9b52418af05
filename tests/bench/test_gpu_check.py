"""bench/gpu_check.py: its --smoke run on the CPU with Ray, Hydra, omegaconf, vLLM and DeepSpeed
absent (as on the GPU machine), and its figures' arithmetic."""

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ABSENT = ("ray", "hydra", "omegaconf", "vllm", "deepspeed")
# A None entry in sys.modules is Python's "not installed": ``import ray`` raises ImportError and
# importlib.util.find_spec("ray") returns None. (A meta-path finder that raises would turn
# transformers' optional-package probes, which call find_spec, into crashes the GPU machine never has.)
BLOCK = "import sys\nfor name in %r:\n    sys.modules[name] = None\n" % (ABSENT,)


def run_blocked(code: str, *args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": cwd}
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_block_makes_the_packages_absent():
    proc = run_blocked("import importlib.util\nassert importlib.util.find_spec('ray') is None\nimport ray\n")
    assert proc.returncode != 0 and "ModuleNotFoundError: import of ray halted" in proc.stderr, proc.stderr[-2000:]


def test_smoke_runs_without_ray_hydra_and_its_logprobs_match_tightly(tmp_path):
    script = "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    proc = run_blocked(script, os.path.join("bench", "gpu_check.py"), "--smoke", "--cache-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: device=cpu dtype=float32 "), last
    v = dict(re.findall(r"(\w+)=(\S+)", last))
    assert v["ok"] == "True"
    assert float(v["logprob_max_diff"]) < 1e-4  # fp32: only summation order differs (1.9e-6 measured)
    assert float(v["gen_tokens_per_s"]) > 0 and float(v["train_tokens_per_s"]) > 0
    params = float(re.search(r"([\d.]+)M matmul params", proc.stdout).group(1)) * 1e6
    assert float(v["mfu"]) == pytest.approx(6 * params * float(v["train_tokens_per_s"]) / 989e12, rel=1e-2)  # both printed to 3-4 digits
    assert float(v["peak_mem_gb"]) > 0.1  # the CPU's peak RSS: torch and two models are far above this
    assert len(re.findall(r"^step \d+: ", proc.stdout, re.M)) == 2


def test_mfu_and_matmul_params_by_hand():
    import gpu_check
    from transformers import LlamaConfig, LlamaForCausalLM

    assert gpu_check.mfu(10**9, 1000.0, 6e12) == pytest.approx(1.0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
               num_key_value_heads=1)
    tied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True))
    untied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    # the LM head (64 x 32) counts once either way; an untied input embedding is a lookup
    body = sum(p.numel() for n, p in untied.named_parameters() if not n.startswith(("model.embed", "lm_head")))
    assert gpu_check.matmul_params(tied) == gpu_check.matmul_params(untied) == body + 64 * 32


def test_logprob_gap_counts_response_tokens_only():
    import gpu_check
    from relaxrl.sample import Sample, collate

    samples = [Sample(uid=f"g/{i}", group_id="g", index=i, prompt_ids=[1, 2], response_ids=[3, 4, 5][: 3 - i],
                      behaviour_logprobs=[-1.0, -2.0, -3.0][: 3 - i], reward=0.0) for i in range(2)]  # fmt: skip
    batch = collate(samples, pad_id=0)
    trainer = batch.behaviour_logprobs.clone()
    trainer[0, 1] += 0.5  # row 0's first response token (column prompt_len - 1)
    trainer[1, 3] += 9.0  # row 1's padding: must not count
    d_max, d_mean, spread = gpu_check.logprob_gap(trainer, batch)
    assert d_max == pytest.approx(0.5) and d_mean == pytest.approx(0.5 / 5)
    assert spread == pytest.approx(float(torch.tensor([-1.0, -2.0, -3.0, -1.0, -2.0]).std()))
