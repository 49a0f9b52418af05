"""Compose a run config in-process, as ``python -m relaxrl.train`` would."""

from hydra import compose, initialize_config_module

FAST = [
    "+experiment=quickstart",
    "model.warm_start.steps=100",
    "logger.progress=false",
    "trainer.save_final=false",
]


def make_cfg(run_dir, cache_dir, *overrides):
    with initialize_config_module(config_module="relaxrl.conf", version_base=None):
        return compose(
            config_name="config",
            overrides=[*FAST, f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", *overrides],
        )
