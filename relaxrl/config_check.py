"""Refuse keys the schema does not know, even ones added on purpose with Hydra's ``+key=value``.

Hydra already rejects a misspelled ``key=value``; ``+key=value`` is allowed to add a key, which no
code would read: the run would go on as if the setting had been applied.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Dotted names of keys in ``node`` (recursively) that its dataclass schema does not declare."""
    known = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in known:
            out.append(name)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            child_type = OmegaConf.get_type(child)
            if dataclasses.is_dataclass(child_type):
                out += unknown_keys(child, child_type, name + ".")
    return out


def check_known_keys(cfg: DictConfig, schema: type) -> None:
    bad = unknown_keys(cfg, schema)
    if bad:
        raise ValueError(f"unknown config key(s) {bad}: not in the schema (relaxrl/config.py), so nothing would "
                         "read them; check the spelling, and drop the '+' for keys that exist")


def fill_from_rollout(cfg: DictConfig) -> None:
    """Fill in, in place, the algorithm settings whose 0 means "the rollout's value":
    ``algorithm.loss_agg_len`` (Dr.GRPO's constant L of ``seq_mean_token_sum``) from
    ``rollout.max_new_tokens``, the generation limit, so the constant is the same for every batch
    (and the resolved config records it). Algorithms without the key are left as they are."""
    alg = cfg.algorithm
    if "loss_agg_len" in alg and alg.loss_agg_len == 0:
        alg.loss_agg_len = int(cfg.rollout.max_new_tokens)
