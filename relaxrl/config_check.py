"""Checks of a composed config that must fail before Ray or any role starts.

Unknown keys: Hydra already rejects a misspelled ``key=value``; ``+key=value`` is allowed to add a
key, which no code would read: the run would go on as if the setting had been applied.
The model directory: a missing directory, tokenizer or chat template would otherwise surface
minutes later, in a role's replica log.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

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


def prompt_template_of(cfg: DictConfig) -> Optional[str]:
    """``env.prompt_template``, or None for an env schema without one (the chat template is used)."""
    return OmegaConf.select(cfg, "env.prompt_template", default=None)


def check_model_dir(cfg: DictConfig, multi_turn: bool = False) -> None:
    """Fail before Ray or any role starts, with one error naming the fix, when ``model=local`` points
    at something the roles cannot load: no directory, no config.json, no tokenizer, or a tokenizer
    without a chat template while ``env.prompt_template`` is unset (multi-turn episodes are chats: they
    always need the chat template). A tiny model is built by RelaxRL and always has one. Files are
    checked, not loaded: loading a tokenizer costs seconds of imports, and the roles load it anyway."""
    m, template = cfg.model, prompt_template_of(cfg)
    if template is not None:
        from relaxrl.models.chat import check_prompt_template

        check_prompt_template(template)
    if m.source != "local":
        return
    if not m.path:
        raise ValueError("model=local needs model.path=DIR: a local directory written by save_pretrained "
                         "(RelaxRL never downloads models)")
    path = Path(os.path.expanduser(m.path))
    if not path.is_dir():
        raise FileNotFoundError(f"model.path={m.path!r} is not a directory (resolved: {str(path.absolute())!r}); "
                                "point it at a local directory written by save_pretrained")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={m.path!r} has no config.json: not a saved model directory "
                                "(save the model there with model.save_pretrained(DIR))")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"model.path={m.path!r} has no tokenizer (none of {list(_TOKENIZER_FILES)}); "
                                "save it there too with tokenizer.save_pretrained(DIR)")
    from relaxrl.models.chat import NO_TEMPLATE_FIX, has_chat_template

    if has_chat_template(path):
        return
    if multi_turn:
        raise ValueError(f"model.path={m.path!r}: the tokenizer has no chat template, and multi-turn episodes "
                         "are rendered as chats (env.prompt_template does not apply); set a chat_template in "
                         "its tokenizer_config.json or use a chat/instruct model")
    if template is None:
        raise ValueError(f"model.path={m.path!r}: the tokenizer has no chat template; {NO_TEMPLATE_FIX}")


# Any one of these is a tokenizer save_pretrained wrote (a fast tokenizer, or a slow one's vocabulary).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def fill_from_rollout(cfg: DictConfig) -> None:
    """Fill in, in place, the algorithm settings whose 0 means "the rollout's value":
    ``algorithm.loss_agg_len`` (Dr.GRPO's constant L of ``seq_mean_token_sum``) from
    ``rollout.max_new_tokens``, the generation limit, so the constant is the same for every batch
    (and the resolved config records it). Algorithms without the key are left as they are."""
    alg = cfg.algorithm
    if "loss_agg_len" in alg and alg.loss_agg_len == 0:
        alg.loss_agg_len = int(cfg.rollout.max_new_tokens)


def check_rollout(cfg: DictConfig) -> None:
    """Rollout settings the replicas read, refused before anything starts rather than in a replica."""
    from relaxrl.partial import check_mode

    check_mode(cfg.rollout.partial)
    if not float(cfg.weight_sync.bucket_mb) > 0:
        raise ValueError(f"weight_sync.bucket_mb must be > 0 (the size of a weight version's parts), got "
                         f"{cfg.weight_sync.bucket_mb}")


def check_trainer(cfg: DictConfig) -> None:
    """Trainer settings only the embedded engine implements, refused before anything starts."""
    tr = cfg.trainer
    updates = int(tr.mini_batches) * int(tr.ppo_epochs)
    if tr.mini_batches < 1 or tr.ppo_epochs < 1 or tr.max_tokens_per_micro_batch < 0:
        raise ValueError(f"trainer.mini_batches ({tr.mini_batches}) and trainer.ppo_epochs ({tr.ppo_epochs}) must be "
                         f">= 1 and trainer.max_tokens_per_micro_batch ({tr.max_tokens_per_micro_batch}) >= 0")
    # The torch engine does them per data-parallel rank too (each rank its share of each mini-batch).
    if (updates > 1 or tr.max_tokens_per_micro_batch) and tr.engine != "torch":
        raise ValueError("trainer.mini_batches, trainer.ppo_epochs and trainer.max_tokens_per_micro_batch are "
                         f"implemented by trainer.engine=torch (got engine={tr.engine})")
    if tr.mini_batches > cfg.rollout.groups_per_step:
        raise ValueError(f"trainer.mini_batches={tr.mini_batches} exceeds rollout.groups_per_step="
                         f"{cfg.rollout.groups_per_step}: a mini-batch holds whole groups")
