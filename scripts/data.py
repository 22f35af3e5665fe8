"""Data: the datalist, the unpaired source/target batch stream, and the up-front dataset check.

Transforms themselves are declared in configs/train.yaml (MONAI dictionary transforms); this module only
holds what a config cannot express in a line.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset, get_track_meta, load_decathlon_datalist, set_track_meta
from monai.transforms import Compose, Randomizable
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


def optional_split(datalist: str | os.PathLike, dataset_dir: str | os.PathLike, split: str) -> list[dict] | None:
    """``read_split``, or None when the datalist has no such split (e.g. target_train_labels, which only a
    benchmark has)."""
    return read_split(datalist, dataset_dir, split) if validation.read_datalist(datalist).get(split) else None


def preprocessed_slices(entries: Iterable[dict], transform: Callable) -> Iterator[dict[str, torch.Tensor]]:
    """Each datalist entry preprocessed by ``transform``, one at a time: its image (and label, if it has one) as
    the (D, 1, H, W) 2D slices the networks see, and the affine of the preprocessed grid."""
    for entry in entries:
        item = transform(entry)
        slices = {key: torch.as_tensor(item[key]).permute(3, 0, 1, 2).float()
                  for key in ("image", "label") if key in item}
        yield {**slices, "affine": np.asarray(item["image"].affine)}


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
    data-loader worker, with its own copy of the transforms, produces it.

    Items come out as plain tensors: the random transforms run with MONAI's metadata tracking off, since the
    trainer reads the pixels alone (on the phantom this made a draw 2.9x faster, values unchanged:
    docs/speed.md). Reseeding is ``reseed_in_place`` when it is checked, at construction, to give the states
    MONAI's ``set_random_state`` gives; else ``set_random_state`` itself.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.reseed = reseed_in_place if reseeds_as_monai(dataset.transform) else _reseed_as_monai
        self.dataset.transform.set_random_state(seed=0)  # every transform its own RandomState, reseeded in place

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: tuple[int, int]) -> Any:
        index, seed = draw
        self.reseed(self.dataset.transform, seed)
        with metadata_untracked():
            return self.dataset[index]


@contextmanager
def metadata_untracked() -> Iterator[None]:
    """MONAI transforms inside this block return plain tensors, without metadata or applied-operation records."""
    tracked = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracked)


def _reseed_as_monai(transform: Randomizable, seed: int) -> None:
    transform.set_random_state(seed=seed)


def reseed_in_place(transform: Randomizable, seed: int) -> None:
    """What ``transform.set_random_state(seed=seed)`` does for a Compose of MONAI transforms (each child seeded
    from the Compose's generator, a dictionary transform's inner array transforms with its own seed), by
    reseeding the RandomState objects the transforms already hold: building one costs about 180 us here, five
    per training item, reseeding one 3 us."""
    transform.R.seed(seed % MAX_SEED)
    if isinstance(transform, Compose):
        for child in transform.transforms:
            if isinstance(child, Randomizable):
                reseed_in_place(child, int(transform.R.randint(MAX_SEED, dtype="uint32")))
        return
    for inner in vars(transform).values():
        if isinstance(inner, Randomizable):
            reseed_in_place(inner, seed)


def random_states(transform: Randomizable) -> list[np.random.RandomState]:
    """Every RandomState reachable from ``transform``, its own first, in a fixed order."""
    found = [transform.R]
    inner = transform.transforms if isinstance(transform, Compose) else vars(transform).values()
    for child in inner:
        if isinstance(child, Randomizable):
            found += random_states(child)
    return found


def reseeds_as_monai(transform: Randomizable, seed: int = 12345) -> bool:
    """Whether ``reseed_in_place`` leaves copies of ``transform`` in the states ``set_random_state`` gives them,
    with no RandomState shared between two transforms (a transform MONAI does not know how to reseed, say a
    custom one with its own rules, makes this False)."""
    by_monai, in_place = copy.deepcopy(transform), copy.deepcopy(transform)
    by_monai.set_random_state(seed=seed)
    in_place.set_random_state(seed=0)
    reseed_in_place(in_place, seed)
    expected, states = random_states(by_monai), random_states(in_place)
    if len({id(state) for state in states}) != len(states) or len(states) != len(expected):
        return False
    return all(_same_state(a, b) for a, b in zip(expected, states))


def _same_state(a: np.random.RandomState, b: np.random.RandomState) -> bool:
    (_, keys_a, pos_a, *rest_a), (_, keys_b, pos_b, *rest_b) = a.get_state(), b.get_state()
    return pos_a == pos_b and np.array_equal(keys_a, keys_b) and rest_a == rest_b


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
    neither domain's data is repeated to match the other's length. Without a ``target_loader`` (a source-only
    run, whose terms never read x_t: ``scripts.trainer.reads_target_images``) the items hold the source batch
    alone, and no target batch is drawn. Target items that carry a label (self-training's pseudo-labels) give it
    as ``target_label``.
    """

    def __init__(self, source_loader: Iterable[dict], target_loader: Iterable[dict] | None = None) -> None:
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
        sources = self._forever(self.source_loader)
        if self.target_loader is None:
            for source in sources:
                yield {"source_image": source["image"], "source_label": source["label"]}
            return
        for source, target in zip(sources, self._forever(self.target_loader)):
            item = {"source_image": source["image"], "source_label": source["label"], "target_image": target["image"]}
            if "label" in target:  # pseudo-labels (self-training)
                item["target_label"] = target["label"]
            yield item
