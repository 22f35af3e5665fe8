"""Data: the datalist, the unpaired source/target batch stream, and the up-front dataset check.

Transforms themselves are declared in configs/train.yaml (MONAI dictionary transforms); this module only
holds what a config cannot express in a line.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import Dataset, load_decathlon_datalist
from monai.data.utils import set_rnd

from scripts import validation

SPLITS = validation.SPLITS

HOW_TO_GET_DATA = """\
Prepare real data as a datalist JSON (format: docs/data.md) and point the bundle at it:
    python -m monai.bundle run training --config_file configs/train.yaml \\
        --dataset_dir /path/to/data --datalist /path/to/data/datalist.json
(on a CPU: --config_file "['configs/train.yaml','configs/cpu.yaml']"), or run the self-contained CPU demo,
which generates its own phantom data:
    python -m monai.bundle run demo --config_file "['configs/train.yaml','configs/cpu.yaml','configs/demo.yaml']\""""


class DatasetNotFoundError(SystemExit):
    """Raised before any training starts when the dataset is absent: a message, not a traceback
    (a SystemExit subclass, so `monai.bundle run` ends with the text and exit status 1)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"ERROR: {problem}\n\n{HOW_TO_GET_DATA}")


def check_dataset(dataset_dir: str | os.PathLike, datalist: str | os.PathLike, num_classes: int | None = None) -> None:
    """Stop at once, with instructions, when the dataset folder or its datalist is missing; then check every
    listed volume (scripts/validation.py: missing files, unreadable, empty, NaN, 4D, shape mismatch, label values
    outside 0..num_classes-1 when ``num_classes`` is given), each fault one ``ERROR:`` message."""
    if not Path(dataset_dir).is_dir():
        raise DatasetNotFoundError(f"dataset_dir {str(dataset_dir)!r} does not exist.")
    if not Path(datalist).is_file():
        raise DatasetNotFoundError(f"datalist {str(datalist)!r} does not exist.")
    entries = validation.read_datalist(datalist)
    missing = [split for split in ("source_train", "target_train", "target_val") if not entries.get(split)]
    if missing:
        raise DatasetNotFoundError(f"datalist {str(datalist)!r} has no entries for {missing}.")
    validation.validate_datalist(dataset_dir, datalist, num_classes)


def read_split(datalist: str | os.PathLike, dataset_dir: str | os.PathLike, split: str) -> list[dict]:
    """Entries of one split with paths resolved against ``dataset_dir``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=split, base_dir=dataset_dir)


def preprocessed_slices(entries: Iterable[dict], transform: Callable) -> Iterator[dict[str, torch.Tensor]]:
    """Each datalist entry preprocessed by ``transform``, one at a time: its image (and label, if it has one) as
    the (D, 1, H, W) 2D slices the networks see."""
    for entry in entries:
        item = transform(entry)
        yield {key: torch.as_tensor(item[key]).permute(3, 0, 1, 2).float() for key in ("image", "label") if key in item}


class UnpairedBatches:
    """An endless stream of unpaired training batches: each item holds a labelled source batch and an
    unlabelled target batch drawn independently, as DSAN's iteration needs.

    Each loader is restarted (and so reshuffled) whenever it runs out, independently of the other, so
    neither domain's data is repeated to match the other's length.
    """

    def __init__(self, source_loader: Iterable[dict], target_loader: Iterable[dict]) -> None:
        self.source_loader = source_loader
        self.target_loader = target_loader

    @staticmethod
    def _forever(loader: Iterable[dict]) -> Iterator[dict]:
        for epoch in itertools.count():
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):  # a DistributedSampler reshuffles only when told
                sampler.set_epoch(epoch)
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                raise ValueError("a training data loader yielded no batch; is its split empty?")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for source, target in zip(self._forever(self.source_loader), self._forever(self.target_loader)):
            yield {"source_image": source["image"], "source_label": source["label"], "target_image": target["image"]}


class EpochSeededAugmentation:
    """At each epoch start, reseeds the random transforms of the training datasets from torch's generator.

    Torch's generator state is part of every checkpoint (scripts.checkpoints.RNGState), so a run resumed at an
    epoch boundary draws exactly the crops and rotations that the uninterrupted run drew.
    """

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self.datasets = list(datasets)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for dataset in self.datasets:
            set_rnd(dataset, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
