"""Where the backbones run: ``device: auto`` and ``precision: auto`` resolved for this machine."""

from __future__ import annotations

from typing import Any, Tuple

import torch

PRECISIONS = ("fp32", "fp16", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; an explicit CUDA device must exist."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available on this machine; use device=cpu (or auto)")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``fp16`` on CUDA (as the published code runs), ``fp32`` on CPU (the fast path there)."""
    name = str(name)
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {list(PRECISIONS)}, got {name!r}")
    return name


def resolve_runtime(cfg: Any) -> Tuple[torch.device, str]:
    """Resolve ``cfg.device`` / ``cfg.precision`` and write the resolved values back into ``cfg``
    (so the saved config and the run's records say what was used)."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    cfg.device, cfg.precision = str(device), precision
    return device, precision
