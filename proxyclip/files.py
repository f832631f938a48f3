"""File helpers of the package: atomic writes, content digests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

Content = Union[bytes, str, Callable[[BinaryIO], None]]


def atomic_write(path: os.PathLike, content: Content) -> None:
    """Write ``content`` (bytes, text as UTF-8, or ``fn(binary_file)``) to ``path`` atomically.

    The data goes to a temporary file in the same folder, is flushed to disk, then renamed over
    ``path``: readers (other processes too, e.g. torchrun ranks) see the old file or the new one,
    never a half-written one. The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_digest(path: os.PathLike, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes, algorithm: str = "sha1") -> str:
    """Hex digest of bytes in memory (the same algorithm as :func:`file_digest`)."""
    return hashlib.new(algorithm, data).hexdigest()
