"""Security defaults: loopback-only endpoints, checkpoints that cannot run code, and model-written
code run only in a limited subprocess."""

import ast
import os
import pathlib

import pytest
import torch

from relaxrl.engines.torch_trainer import STATE_FILE, TorchTrainerEngine
from relaxrl.envs.sandbox import python_tests, run_python
from relaxrl.models.tiny import build_tiny_model, build_tokenizer
from tests.reliability.test_bad_input import compose_run

pytestmark = pytest.mark.badinput
ROOT = pathlib.Path(__file__).resolve().parents[2] / "relaxrl"


def test_endpoints_bind_to_loopback_by_default():
    cfg = compose_run()
    assert cfg.ray.host == "127.0.0.1" and cfg.ray.include_dashboard is False
    assert cfg.ray.serve_proxy == "Disabled"
    src = (ROOT / "launch.py").read_text()
    assert "dashboard_host=cfg.ray.host" in src and '"host": cfg.ray.host' in src


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/relaxrl-pwned",))


def test_a_checkpoint_holding_code_is_refused_not_run(tmp_path):
    engine = TorchTrainerEngine(build_tiny_model(build_tokenizer(), hidden_size=64, num_layers=1, num_heads=2,
                                                 num_kv_heads=1, intermediate_size=64))
    engine.save_checkpoint(str(tmp_path))
    torch.save({"optimizer": Exploit()}, tmp_path / STATE_FILE)  # a tampered trainer state
    if os.path.exists("/tmp/relaxrl-pwned"):
        os.remove("/tmp/relaxrl-pwned")
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.load_checkpoint(str(tmp_path))
    assert not os.path.exists("/tmp/relaxrl-pwned")


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "pickle.load", "pickle.loads"):
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((path.name, ast.unparse(node.func), safe))
    assert ("torch_trainer.py", "torch.load", True) in calls
    assert all(safe for _, _, safe in calls), calls


def test_sandbox_runs_code_in_a_limited_subprocess(monkeypatch):
    monkeypatch.setenv("RELAXRL_SECRET_TOKEN", "s3cret")
    r = run_python("import os, sys; print(os.getpid()); print(os.environ.get('RELAXRL_SECRET_TOKEN')); "
                   "print(sys.stdin.read().upper())", stdin="hi")
    pid, secret, echoed = r.stdout.split()
    assert r.ok and int(pid) != os.getpid() and secret == "None" and echoed == "HI"
    loop = run_python("while True: pass", timeout_s=0.5)
    assert loop.timed_out and not loop.ok
    memory = run_python("x = bytearray(1 << 31)", memory_mb=256)
    assert memory.returncode != 0 and "MemoryError" in memory.stderr
    disk = run_python("open('f', 'wb').write(b'0' * (8 << 20))", file_mb=1)
    assert disk.returncode != 0 and "File too large" in disk.stderr
    fork_bomb = run_python("import os, time\nfor _ in range(3): os.fork()\ntime.sleep(60)", timeout_s=0.5)
    assert fork_bomb.timed_out  # the whole process group is killed


def test_code_verifier_scores_in_the_sandbox():
    tests = "assert square(3) == 9\nassert square(-2) == 4"
    assert python_tests("```python\ndef square(x):\n    return x * x\n```", tests) == 1.0
    assert python_tests("def square(x):\n    return x + x", tests) == 0.0
    # Exiting with status 0 before the tests finish is not a pass.
    assert python_tests("def square(x):\n    raise SystemExit(0)", tests) == 0.0
    assert python_tests("import os\nos._exit(0)", tests) == 0.0
