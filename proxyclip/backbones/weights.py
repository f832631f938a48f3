"""Where weights come from: the model hub (fail fast offline), local files, or seeded random."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import torch

T = TypeVar("T")
HUB_HOST = "huggingface.co"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had; the message says what to do."""


class CheckpointMismatch(ValueError):
    """A local checkpoint that does not fit the configured architecture."""


def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection within ``timeout`` seconds."""
    if hub_offline_requested():
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Put huggingface_hub in offline mode when the hub cannot be reached.

    Cached weights still load; anything not cached fails at once instead of retrying
    for a minute. Yields whether the hub is reachable.
    """
    reachable = hub_reachable()
    if reachable:
        yield True
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = old


def hub_failure_message(what: str, reachable: bool, config_hint: str) -> str:
    cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    why = ("the hub answered but the download failed" if reachable else
           f"the model hub ({HUB_HOST}) cannot be reached and the weights are not in the local cache ({cache})")
    return (f"pretrained weights for {what} are not available: {why}. "
            f"Either run once on a machine with network access to fill the cache, "
            f"or use local files (weights=local {config_hint}=/path/to/checkpoint), "
            f"or use seeded random weights for a smoke run (weights=random).")


def check_checkpoint_file(path: Optional[str], field: str) -> Path:
    if not path:
        raise ValueError(f"weights=local needs {field}=/path/to/checkpoint (it is not set)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{field}: checkpoint file not found: {p}")
    return p


def mismatch_error(path: Path, what: str, err: Exception) -> CheckpointMismatch:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    detail = "; ".join(lines[:3])
    if len(detail) > 600:
        detail = detail[:600] + " ..."
    return CheckpointMismatch(f"checkpoint {path} does not match the architecture {what}: {detail}")


@contextlib.contextmanager
def quiet_library_logs() -> Iterator[None]:
    """Silence open_clip's INFO chatter on the root logger (``Parsing tokenizer ...``) while a model
    or tokenizer is built; its warnings still show, failures surface as our errors."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(old)


def seeded(seed: int, name: str, build: Callable[[], T]) -> T:
    """Build with the global RNG seeded from ``(seed, name)``, restoring the caller's RNG state afterwards.

    The model's name is mixed into the seed, so two models of the same architecture under
    different names (``dino_vitb16``, ``mae_vitb16``) do not get identical random weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{int(seed)}:{name}".encode()))  # the CPU generator keeps 32 bits
        return build()
