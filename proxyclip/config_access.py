"""Reading a composed config: the running Hydra job's folder, one field of any config-like
object, the resolved config as plain Python. Re-exported by proxyclip.config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


def hydra_output_dir() -> Optional[str]:
    """The current Hydra job's output folder (its run directory), or None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return str(HydraConfig.get().runtime.output_dir)
    except Exception:  # a partial HydraConfig (compose API)
        pass
    return None


def config_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a DictConfig, a dict, a dataclass or None (then ``default``)."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):  # dict, DictConfig
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (for JSON/YAML and loggers)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
