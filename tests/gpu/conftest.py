"""GPU-only tests (marked ``gpu``): skipped with a reason where CUDA, vllm or deepspeed is missing.

Select them with ``pytest -m gpu``. What ran on real hardware is recorded in docs/engines.md."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs(gpus: int = 1, *packages: str):
    """Skip unless ``gpus`` CUDA devices and ``packages`` are present; the reason names what is missing."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if cuda_devices() < gpus:
        return pytest.mark.skip(reason=f"needs {gpus} CUDA GPU(s), found {cuda_devices()}")
    if missing:
        return pytest.mark.skip(reason=f"needs {', '.join(missing)} (pip install 'relaxrl[gpu]')")
    return pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    """A small but not trivial Qwen2 (hidden 512, 4 layers) saved locally: no hub on GPU machines."""
    from relaxrl.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                             intermediate_size=1408, max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("gpu-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
