"""The evaluation loop: one encode per image, one decode per hyperparameter point, confusion matrices.

A plain evaluation is a grid of one point (the config's ``method`` values); a sweep is a
grid of many. Either way each image is encoded once (or read from the feature cache) and
decoded once per point, and each point accumulates its own ``(K, K)`` confusion matrix over
the dataset. The loop is

- resumable: the matrices and the list of counted images are saved together, atomically
  (:mod:`.state`); a restart in the same run directory skips the counted images;
- distributed: under ``torchrun`` each process takes every ``world_size``-th image and the
  matrices are summed at the end (:mod:`.distributed`);
- read ahead: a ``torch.utils.data.DataLoader`` with ``num_workers`` processes reads and decodes
  the images and label maps of exactly this process's to-do list, in its order, while the main
  process encodes and decodes (the workers only open files: no model, no CUDA).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..data import BadLabelError, DatasetNotFoundError, SegmentationDataset
from ..metrics import confusion_matrix, metrics_from_confusion
from ..specs import DecodeSpec, digest
from .cache import FeatureCache
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, shard
from .state import RunState

log = logging.getLogger(__name__)


def select_indices(n: int, limit: Optional[int], seed: int = 0) -> List[int]:
    """All ``n`` indices, or a reproducible random subset of ``limit`` of them (sorted)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    return sorted(random.Random(seed).sample(range(n), int(limit)))


def selection_record(dataset: SegmentationDataset, cfg: Any = None) -> Dict[str, Any]:
    """Which images and labels a run counts: the dataset, its (subset of) samples, the class source,
    the label conventions (part of every run's identity, beside its encode and decode specs)."""
    d = cfg.dataset if cfg is not None and "dataset" in cfg else None
    background = None if d is None or d.get("background") is None else [str(x) for x in d.background]
    return {"dataset": dataset.name, "num_samples": len(dataset), "samples": digest([s.id for s in dataset.samples]),
            "limit": None if cfg is None else cfg.get("limit"),
            "limit_seed": None if cfg is None or cfg.get("limit") is None else int(cfg.get("limit_seed") or 0),
            "classnames": None if d is None else str(d.classnames), "background": background,
            "reduce_zero_label": dataset.reduce_zero_label, "ignore_index": dataset.ignore_index}


def fingerprint(seg, points: Sequence[DecodeSpec], selection: Dict[str, Any]) -> Dict[str, Any]:
    """What a saved state must match to be resumed: the encode spec, every point's decode spec and
    the selection. Flattened, its fields name what differs (``decode.postprocess.name``)."""
    decode = points[0].record() if len(points) == 1 else {str(i): p.record() for i, p in enumerate(points)}
    return {"encode": seg.encode_spec.record(), "decode": decode, "selection": selection}


@dataclass
class GridResult:
    points: List[DecodeSpec]
    cm: torch.Tensor  # (G, K, K) summed over processes
    class_names: List[str]  # display names (class 0 "background" where it is the background)
    num_images: int  # images counted (all processes)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    values: List[Dict[str, Any]] = field(default_factory=list)  # the swept values of each point ({} for an eval)

    def __post_init__(self):
        if not self.metrics:
            self.metrics = [metrics_from_confusion(self.cm[g], self.class_names) for g in range(len(self.points))]
        if not self.values:
            self.values = [{} for _ in self.points]


class _Stop(Exception):
    pass


def default_num_workers() -> int:
    """Read-ahead workers when ``num_workers`` is unset: one core stays for the models, at most 4
    workers, none (read in-process) on a single core."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(4, cores - 1)


class _Reads(torch.utils.data.Dataset):
    """What a read-ahead worker does for dataset index ``i``: ``(i, PIL image, label)``, where a
    label that cannot be evaluated comes back as its BadLabelError (``bad_labels=skip`` decides in
    the main process) and an unreadable file as its DatasetNotFoundError (raised there, one line)."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image = self.dataset.load_image(i)
        except DatasetNotFoundError as e:
            return i, None, e
        try:
            return i, image, self.dataset.load_label(i, expected_size=image.size)
        except (BadLabelError, DatasetNotFoundError) as e:
            return i, image, e


def _as_is(item):
    return item


def _worker_init(_worker_id: int) -> None:
    # SIGTERM is the main process's to handle (it saves, then shuts the workers down); one thread each
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def _reader(dataset: SegmentationDataset, todo: Sequence[int], num_workers: int):
    """A DataLoader over exactly ``todo`` (this process's images not yet counted), one sample at a time."""
    workers = min(num_workers, len(todo))
    return torch.utils.data.DataLoader(
        _Reads(dataset), batch_size=None, sampler=list(todo), num_workers=workers, collate_fn=_as_is,
        worker_init_fn=_worker_init if workers else None, persistent_workers=False)


def run_grid(
    seg,
    dataset: SegmentationDataset,
    points: Sequence[DecodeSpec],
    run_dir: os.PathLike,
    *,
    selection: Optional[Dict[str, Any]] = None,
    resume: bool = True,
    info: DistInfo = DistInfo(),
    cache: Optional[FeatureCache] = None,
    checkpoint_seconds: float = 10.0,
    progress: bool = True,
    logger: Any = None,
    log_images: int = 0,
    print_fn: Callable[[str], None] = print,
    before_count: Optional[Callable[[int], None]] = None,
    num_workers: Optional[int] = None,
) -> GridResult:
    """Evaluate every point of ``points`` (DecodeSpecs) on ``dataset`` (already subset), resumably
    and sharded. ``selection``: the run's :func:`selection_record` (default: from ``dataset``);
    ``resume=False`` discards a saved state of ``run_dir`` instead of continuing it.

    ``before_count(n)``: called after each image is decoded and before it is counted, with the
    number of images this process counted so far (tests inject faults there).
    ``num_workers``: read-ahead processes (0 = read in this process; None = :func:`default_num_workers`).
    Returns the matrices summed over all processes (every process gets the same result).
    """
    t0 = time.time()
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 (read in this process) or more, got {num_workers}")
    points = list(points)
    k = dataset.num_classes
    state = RunState(Path(run_dir), info.rank, info.world_size,
                     fingerprint(seg, points, selection or selection_record(dataset)), (len(points), k, k))
    if not resume:
        if info.is_main and state.dir.is_dir():
            print_fn(f"resume=false: discarding the saved state in {state.dir}")
            shutil.rmtree(state.dir)
        barrier(info)
    if state.load():
        print_fn(f"resuming {state.path}: {len(state.done)} images already counted"
                 + (f", plus {len(state.foreign_done)} by an earlier attempt with another number of processes"
                    if state.foreign_done else ""))
    mine = shard(range(len(dataset)), info)
    todo = [i for i in mine if not state.is_done(dataset.samples[i].id)]
    loop = _Loop(seg, dataset, points, state, cache=cache, checkpoint_seconds=checkpoint_seconds, logger=logger,
                 log_images=log_images if info.is_main else 0, print_fn=print_fn, before_count=before_count,
                 num_workers=num_workers)
    bar = _progress_bar(dataset, info, total=len(mine), initial=len(mine) - len(todo)) if progress else None
    loop.run(todo, bar)
    return _gather(state, dataset, points, info, seconds=time.time() - t0)


def _progress_bar(dataset: SegmentationDataset, info: DistInfo, total: int, initial: int):
    if not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True,
                desc=f"{dataset.name}" + (f" [rank 0/{info.world_size}]" if info.enabled else ""))


class _Loop:
    """This process's images: encode once, decode per point, count, save the state now and then."""

    def __init__(self, seg, dataset: SegmentationDataset, points: List[DecodeSpec], state: RunState, *,
                 cache: Optional[FeatureCache], checkpoint_seconds: float, logger: Any, log_images: int,
                 print_fn: Callable[[str], None], before_count: Optional[Callable[[int], None]],
                 num_workers: int = 0):
        self.seg, self.dataset, self.points, self.state = seg, dataset, points, state
        self.keep = sorted({part for pt in points for part in seg.parts_of(pt)})  # layer parts the decodes read
        self.cache, self.checkpoint_seconds = cache, checkpoint_seconds
        self.logger, self.log_images, self.print_fn = logger, log_images, print_fn
        self.before_count, self.num_workers = before_count, num_workers
        self.logged = self.counted = 0
        self.last_save = time.time()
        self.dirty = False

    def run(self, todo: Sequence[int], bar) -> None:
        def on_term(signum, frame):  # SLURM preemption / kill: save what is counted, then stop
            raise _Stop()

        old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
        reads = iter(_reader(self.dataset, todo, self.num_workers)) if todo else iter(())
        try:
            for n_left, (i, image, label) in zip(range(len(todo), 0, -1), reads):
                self.image(i, image, label, n_left)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"mIoU {metrics_from_confusion(self.state.cm[0])['mIoU']:.2f}")
        except (KeyboardInterrupt, _Stop):
            self.save_if_dirty()
            self.print_fn(f"interrupted: {len(self.state.done)} images counted and saved in {self.state.path}; "
                          f"run the same command with the same run directory to continue")
            raise KeyboardInterrupt
        finally:
            shutdown = getattr(reads, "_shutdown_workers", None)  # stop the read-ahead workers now
            if shutdown is not None:
                shutdown()
            if bar is not None:
                bar.close()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        self.save_if_dirty()

    def image(self, i: int, image, label, n_left: int) -> None:
        """Count image ``i`` (its PIL image and label tensor, or the label's BadLabelError, read ahead)."""
        ds, sample = self.dataset, self.dataset.samples[i]
        if isinstance(label, BadLabelError) and ds.bad_labels == "skip":
            self.print_fn(f"skipping {sample.id}: {label}")
            self.state.add(sample.id, skipped=str(label))
            self.dirty = True
            return
        if isinstance(label, Exception):
            raise label
        if self.cache is not None:
            enc = self.cache.get_or_encode(sample.image,
                                           lambda reuse: self.seg.encode(image, reuse=reuse, keep=self.keep,
                                                                         image_id=sample.image.stem),
                                           remaining=n_left, need=self.keep)
        else:
            enc = self.seg.encode(image, keep=self.keep, image_id=sample.image.stem)
        k = ds.num_classes
        cm_img = torch.zeros((len(self.points), k, k), dtype=torch.int64)
        # points differing only in logit_scale / prob_thd share one last block and one set of window scores
        preds = self.seg.decode_many(enc, ds.class_names, self.points, keep_prob=False)
        for g, pred in enumerate(preds):
            cm_img[g] = confusion_matrix(pred.labels.cpu(), label, k, ds.ignore_index)
            if g == 0 and self.logger is not None and self.logged < self.log_images:
                self.logger.log_segmentation(f"{ds.name}/{sample.id}", image, pred.labels.cpu(), label,
                                             ds.display_names, ignore_index=ds.ignore_index)
                self.logged += 1
        if self.before_count is not None:
            self.before_count(self.counted)
        self.state.add(sample.id, cm_img)
        self.counted += 1
        self.dirty = True
        if self.checkpoint_seconds <= 0 or time.time() - self.last_save >= self.checkpoint_seconds:
            self.state.save()
            self.last_save, self.dirty = time.time(), False

    def save_if_dirty(self) -> None:
        if self.dirty:
            self.state.save()
            self.dirty = False


def _gather(state: RunState, dataset: SegmentationDataset, points: List[DecodeSpec], info: DistInfo,
            seconds: float) -> GridResult:
    """Sum the matrices over processes; check that every selected image was counted or skipped once."""
    barrier(info)
    # every process read the same earlier-attempt files: add them once, after the sum
    cm = all_reduce_sum(state.cm, info) + state.foreign_cm
    gathered = all_gather_objects((len(state.done), state.skipped), info)
    counted = sum(n for n, _ in gathered) + len(state.foreign_done)
    skipped = [s for _, sk in gathered for s in sk] + state.foreign_skipped
    if counted != len(dataset):
        raise RuntimeError(f"{counted} images accounted for, but the dataset selection has {len(dataset)}")
    return GridResult(points=points, cm=cm, class_names=list(dataset.display_names),
                      num_images=counted - len(skipped), skipped=skipped, seconds=seconds)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
