"""Name -> (algorithm class, config dataclass) registry, so configs can pick an algorithm by name."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, TypeVar

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, tuple[type, type]] = {}


def register_algorithm(name: str, config_cls: type) -> Callable[[T], T]:
    """Class decorator: register ``cls`` under ``name``, built from a ``config_cls`` dataclass."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls for algorithm {name!r} must be a dataclass, got {config_cls!r}")

    def decorate(cls: T) -> T:
        previous = _REGISTRY.get(name)
        if previous is not None and previous[0] is not cls:
            raise ValueError(f"algorithm {name!r} is already registered by {previous[0].__qualname__}")
        _REGISTRY[name] = (cls, config_cls)
        cls.name = name  # the Algorithm protocol's ``name`` is the registered one
        return cls

    return decorate


def available_algorithms() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def _as_plain(cfg: Any) -> Any:
    """A config dataclass instance or a plain ``dict`` from any of the accepted config forms."""
    # A DictConfig exists only once omegaconf is imported; not importing it here keeps the
    # algorithms importable where Hydra/omegaconf are absent (bench/gpu_check.py on a GPU machine).
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(cfg, omegaconf.DictConfig):
        OmegaConf = omegaconf.OmegaConf
        if dataclasses.is_dataclass(OmegaConf.get_type(cfg)):  # structured config: keep its types
            return OmegaConf.to_object(cfg)
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return cfg
    if isinstance(cfg, dict):
        return dict(cfg)
    raise TypeError(f"algorithm config must be a dataclass, dict or DictConfig, got {type(cfg).__name__}")


def make_algorithm(cfg: Any) -> Any:
    """Build the algorithm named by ``cfg.name`` (or ``cfg["name"]``) with its config dataclass."""
    plain = _as_plain(cfg)
    name = plain.get("name") if isinstance(plain, dict) else getattr(plain, "name", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; registered: {available_algorithms()}")
    cls, config_cls = _REGISTRY[name]
    if isinstance(plain, config_cls):
        return cls(plain)
    values = plain if isinstance(plain, dict) else dataclasses.asdict(plain)
    allowed = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for algorithm {name!r}; allowed: {allowed}")
    return cls(config_cls(**values))
