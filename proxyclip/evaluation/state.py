"""Resumable evaluation state: confusion matrices plus the ids of the images they count.

One file per process (``<run_dir>/state/rank<r>-of-<w>.pt``), written atomically (temporary
file, fsync, rename): the matrices and the done-list always change together, so an image is
either fully counted and listed, or neither. A restart with the same run directory loads
the file and skips the listed images. A restart with another number of processes reads the
earlier attempt's files without writing them (their images count as done, their matrices are
added once). A restart with different settings (another dataset, subset, model or grid) is
refused rather than mixed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..files import atomic_write
from ..specs import differing

STATE_VERSION = 2  # 2: the fingerprint is the run's identity (encode spec, decode specs, selection)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class RunState:
    def __init__(self, run_dir: Path, rank: int, world_size: int, fingerprint: Dict[str, Any], shape):
        self.dir = Path(run_dir) / "state"
        self.rank = rank
        self.world_size = world_size
        self.fingerprint = fingerprint
        self.path = self.dir / f"rank{rank}-of-{world_size}.pt"
        # (cm, done, skipped) replaced as one tuple, so a signal between two statements can
        # never leave a matrix that counts an image the done-list does not name
        self._data = (torch.zeros(shape, dtype=torch.int64), (), ())
        self._done_set = set()
        self.foreign_cm = torch.zeros(shape, dtype=torch.int64)
        self.foreign_done = []
        self.foreign_skipped = []
        self._foreign_set = set()

    @property
    def cm(self) -> torch.Tensor:
        return self._data[0]

    @property
    def done(self) -> List[str]:
        return list(self._data[1])

    @property
    def skipped(self) -> List[Dict[str, str]]:
        return list(self._data[2])

    def _read(self, path: Path) -> Dict[str, Any]:
        d = torch.load(path, map_location="cpu", weights_only=False)
        if d.get("version") != STATE_VERSION:
            raise RuntimeError(f"{path}: state format version {d.get('version')!r}, this code reads version "
                               f"{STATE_VERSION}; start fresh: a new run directory (hydra.run.dir=...) or resume=false")
        old = d.get("fingerprint", {})
        if old != self.fingerprint:
            diff = differing(old, self.fingerprint)
            detail = "; ".join(f"{k}: {_short(a)} then, {_short(b)} now" for k, (a, b) in diff.items())
            raise RuntimeError(
                f"{self.dir.parent} holds a run made with other settings ({detail}); it is not continued. "
                f"Start fresh: a new run directory (hydra.run.dir=...) or resume=false (discards its saved state)"
            )
        if tuple(d["cm"].shape) != tuple(self.cm.shape):
            raise RuntimeError(f"{path}: confusion matrix shape {tuple(d['cm'].shape)} != {tuple(self.cm.shape)}")
        return d

    def load(self) -> bool:
        """Load a previous state of this run (True if there was one). Raises on a settings mismatch.

        Files of an earlier attempt with another number of processes are read, never written:
        their images count as done (``foreign_*``), so a run can resume on more or fewer processes.
        Every image id is recorded in exactly one file, so nothing is counted twice.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self.foreign_cm = torch.zeros_like(self.cm)
        self.foreign_done: List[str] = []
        self.foreign_skipped: List[Dict[str, str]] = []
        for p in sorted(self.dir.glob("rank*-of-*.pt")):
            if p.name.endswith(f"-of-{self.world_size}.pt"):
                continue
            d = self._read(p)
            self.foreign_cm += d["cm"]
            self.foreign_done += list(d["done"])
            self.foreign_skipped += list(d.get("skipped", []))
        self._foreign_set = set(self.foreign_done)
        if not self.path.is_file():
            return bool(self.foreign_done)
        d = self._read(self.path)
        self._data = (d["cm"], tuple(d["done"]), tuple(d.get("skipped", [])))
        self._done_set = set(self._data[1])
        return True

    def is_done(self, sample_id: str) -> bool:
        return sample_id in self._done_set or sample_id in self._foreign_set

    def add(self, sample_id: str, cm: Optional[torch.Tensor] = None, skipped: Optional[str] = None) -> None:
        if sample_id in self._done_set or sample_id in self._foreign_set:
            raise RuntimeError(f"image {sample_id} would be counted twice")
        cm_old, done, skip = self._data
        new_cm = cm_old + cm if cm is not None else cm_old
        new_skip = skip + ({"id": sample_id, "reason": skipped},) if skipped is not None else skip
        self._data = (new_cm, done + (sample_id,), new_skip)
        self._done_set.add(sample_id)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cm, done, skipped = self._data
        payload = dict(version=STATE_VERSION, fingerprint=self.fingerprint, cm=cm, done=list(done),
                       skipped=list(skipped), rank=self.rank, world_size=self.world_size)
        atomic_write(self.path, lambda f: torch.save(payload, f))

