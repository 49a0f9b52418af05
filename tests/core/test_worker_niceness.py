"""A run's own local Ray starts its workers (every role) at ``ray.worker_niceness``, not Ray's 15."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

SCRIPT = """
import os, ray
from hydra import compose, initialize_config_module
from relaxrl import launch
with initialize_config_module(config_module="relaxrl.conf", version_base=None):
    cfg = compose(config_name="config", overrides=["ray.worker_niceness=7", "ray.num_cpus=1"])
launch.init_ray(cfg)
print("NICENESS", ray.get(ray.remote(lambda: os.nice(0)).remote()))
ray.shutdown()
"""


def test_local_ray_workers_run_at_the_configured_niceness():
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert "NICENESS 7" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
