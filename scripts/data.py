"""Data: the datalist, the unpaired source/target batch stream, and the up-front dataset check.

Transforms themselves are declared in configs/train.yaml (MONAI dictionary transforms); this module only
holds what a config cannot express in a line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset, load_decathlon_datalist
from monai.utils import MAX_SEED
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

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
    missing = [split for split in validation.REQUIRED_SPLITS if not entries.get(split)]
    if missing:
        raise DatasetNotFoundError(f"datalist {str(datalist)!r} has no entries for {missing}.")
    split_labelled(datalist, validation_split(datalist))  # all or none of the validation volumes have labels
    validation.validate_datalist(dataset_dir, datalist, num_classes)


def validation_split(datalist: str | os.PathLike) -> str:
    """The split validation scores: ``target_val``, or ``target_train`` when the datalist lists no target_val
    (a user without any target label still gets the label-free criteria of scripts/selection.py)."""
    return "target_val" if validation.read_datalist(datalist).get("target_val") else "target_train"


def split_labelled(datalist: str | os.PathLike, split: str) -> bool:
    """Whether every entry of ``split`` has a label (False when none has); a split with labels for some entries
    and not others stops with one ERROR line naming them, since it cannot be scored either way."""
    entries = validation.read_datalist(datalist).get(split, [])
    unlabelled = [entry.get("image", "?") for entry in entries if not entry.get("label")]
    if unlabelled and len(unlabelled) < len(entries):
        raise validation.InputError(
            f"{split} in {datalist} has labels for {len(entries) - len(unlabelled)} of {len(entries)} volumes, none "
            f"for {unlabelled[:3]}{' ...' if len(unlabelled) > 3 else ''}: label every {split} volume, or none "
            "(then models are selected without target labels: docs/selection.md)")
    return bool(entries) and not unlabelled


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


class SeededRandomSampler(Sampler[tuple[int, int]]):
    """RandomSampler(replacement=True) whose draws are a function of (``seed``, ``rank``, epoch, pass within the
    epoch) alone: each pass draws ``num_samples`` items of ``data_source`` with replacement, each paired with a
    seed for its random transforms (``SeededItems`` takes the pairs).

    No process's global generator is involved, so ranks draw differently, a run resumed at an epoch boundary
    draws what the uninterrupted run drew, and data-loader workers hold no state that matters.
    ``SamplerEpochs`` tells it the trainer's epoch.
    """

    def __init__(self, data_source: Sized, num_samples: int, seed: int = 0, rank: int = 0) -> None:
        self.num_items = len(data_source)
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.passes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.passes = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # a generator, so a pass counts only once iterated: a DataLoader starting its workers creates and
        # discards one sampler iterator
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, self.passes])
        self.passes += 1
        indices = rng.integers(self.num_items, size=self.num_samples)
        seeds = rng.integers(MAX_SEED, size=self.num_samples)
        yield from zip(indices.tolist(), seeds.tolist())


class SeededItems(TorchDataset):
    """``dataset`` indexed by ``SeededRandomSampler``'s (index, seed) pairs: its random transforms are reseeded
    from the pair's seed before each item, so an item's crop and rotation depend on the draw alone, not on which
    data-loader worker, with its own copy of the transforms, produces it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: tuple[int, int]) -> Any:
        index, seed = draw
        self.dataset.transform.set_random_state(seed=seed)
        return self.dataset[index]


class SamplerEpochs:
    """At each epoch start, gives the training samplers the trainer's epoch, which a resumed run restores
    from its checkpoint (a DistributedSampler, too, reshuffles only when told)."""

    def __init__(self, samplers: Sequence[Sampler]) -> None:
        self.samplers = list(samplers)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(engine.state.epoch)


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
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                raise ValueError("a training data loader yielded no batch; is its split empty?")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for source, target in zip(self._forever(self.source_loader), self._forever(self.target_loader)):
            yield {"source_image": source["image"], "source_label": source["label"], "target_image": target["image"]}
