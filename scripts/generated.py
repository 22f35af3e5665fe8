"""Generated development datasets (the cardiac phantom, the brain benchmark): one folder layout and datalist,
written atomically, and reused untouched when the same generator arguments made it.

Layout under the dataset folder: ``source_train/src_000_{image,label}.nii.gz``, ``target_train/tgt_000_...``,
``target_val/tgt_val_000_...``, ``target_test/tgt_test_000_...`` (``float32`` images, ``uint8`` labels) and
``datalist.json`` with paths relative to the folder. ``target_train`` entries carry no label (a UDA user has
none); the labels of those same volumes are listed apart under ``target_train_labels``, for the
target-supervised upper bound only.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np

DATALIST_NAME = "datalist.json"

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "source_train": ("source_train", "src_"),
    "target_train": ("target_train", "tgt_"),
    "target_val": ("target_val", "tgt_val_"),
    "target_test": ("target_test", "tgt_test_"),
}
"""Split name -> (folder, file stem prefix)."""

SPLIT_STREAMS = {"source_train": 1, "target_train": 2, "target_val": 3, "target_test": 4}
"""Split name -> seed stream id: distinct ids make every volume of every split a different subject."""

VolumeMaker = Callable[[str, int], tuple[np.ndarray, np.ndarray]]
"""(split, index) -> (image, label) of one generated volume."""


def volume_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Two independent generators (geometry, rendering) of one volume, a function of (seed, split, index) alone."""
    geometry, render = np.random.SeedSequence([seed, SPLIT_STREAMS[split], index]).spawn(2)
    return np.random.default_rng(geometry), np.random.default_rng(render)


def check_seed(seed: object) -> int:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_counts(counts: dict[str, object]) -> dict[str, int]:
    """The number of volumes of each split, each a non-negative integer."""
    for split, count in counts.items():
        if int(count) != count or count < 0:
            raise ValueError(f"number of {split} volumes must be a non-negative integer, got {count!r}")
    return {k: int(v) for k, v in counts.items()}


def save_nifti(array: np.ndarray, path: pathlib.Path, spacing_mm: Sequence[float]) -> None:
    img = nib.Nifti1Image(array, np.diag([*spacing_mm, 1.0]))
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _datalist_files(datalist: dict) -> list[str]:
    return [v for key, entries in datalist.items() if key != "metadata"
            for entry in entries for v in entry.values()]


def reusable(output_dir: pathlib.Path, metadata: dict) -> bool:
    """Whether ``output_dir`` holds a complete dataset generated with ``metadata``."""
    try:
        datalist = json.loads((output_dir / DATALIST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(datalist, dict) or datalist.get("metadata") != metadata:
        return False
    return all((output_dir / f).is_file() for f in _datalist_files(datalist))


def owned_by(output_dir: pathlib.Path, generator: str) -> bool:
    """Whether replacing ``output_dir`` can only destroy data ``generator`` wrote."""
    if not output_dir.is_dir():
        return False
    names = {p.name for p in output_dir.iterdir()}
    try:
        meta = json.loads((output_dir / DATALIST_NAME).read_text(encoding="utf-8")).get("metadata", {})
        if meta.get("generator") == generator:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return names <= {DATALIST_NAME, *(folder for folder, _ in SPLIT_FILES.values())}


def move_into_place(tmp: pathlib.Path, output_dir: pathlib.Path) -> None:
    """Rename the complete folder ``tmp`` to ``output_dir``, replacing any folder there only once ``tmp`` is in."""
    if output_dir.exists():
        # Two renames instead of an in-place rewrite: the old dataset stays intact until the new one exists.
        old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output_dir, old)
        try:
            os.replace(tmp, output_dir)
        except OSError:
            os.replace(old, output_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output_dir)


def _write_split(root: pathlib.Path, split: str, count: int, make_volume: VolumeMaker,
                 spacing_mm: Sequence[float]) -> list[dict[str, str]]:
    folder, prefix = SPLIT_FILES[split]
    (root / folder).mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        image, labels = make_volume(split, i)
        entry = {"image": f"{folder}/{prefix}{i:03d}_image.nii.gz", "label": f"{folder}/{prefix}{i:03d}_label.nii.gz"}
        save_nifti(image, root / entry["image"], spacing_mm)
        save_nifti(labels, root / entry["label"], spacing_mm)
        entries.append(entry)
    return entries


def write_dataset(output_dir: str | os.PathLike, metadata: dict, make_volume: VolumeMaker,
                  spacing_mm: Sequence[float], overwrite: bool = False) -> pathlib.Path:
    """Write ``metadata["counts"]`` volumes of each split made by ``make_volume``, and the datalist; return its
    path. A dataset already in ``output_dir`` with the same ``metadata`` is reused untouched (unless
    ``overwrite``); else everything is written to a temporary sibling folder renamed into place once complete,
    so an interrupted run never leaves a dataset that looks complete.

    Raises:
        FileExistsError: ``output_dir`` holds content ``metadata["generator"]`` did not write, and not
            ``overwrite``.
    """
    output_dir = pathlib.Path(output_dir).expanduser().absolute()
    datalist_path = output_dir / DATALIST_NAME
    name = metadata["generator"]
    log, short = logging.getLogger(name), name.rsplit(".", 1)[-1]  # messages on the generator's own logger
    if not overwrite and reusable(output_dir, metadata):
        log.info("%s: reusing existing dataset %s (same generator arguments)", short, datalist_path)
        return datalist_path
    if output_dir.exists() and not overwrite and not owned_by(output_dir, name):
        raise FileExistsError(f"{output_dir} exists and was not generated by {name}; "
                              "pass overwrite=True or choose another folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        datalist: dict = {}
        for split, count in metadata["counts"].items():
            datalist[split] = _write_split(tmp, split, count, make_volume, spacing_mm)
            log.info("%s: wrote %d %s volumes for %s", short, count, split, output_dir)
        datalist["target_train_labels"] = datalist["target_train"]
        datalist["target_train"] = [{"image": e["image"]} for e in datalist["target_train_labels"]]
        datalist["metadata"] = metadata
        # The datalist is written last: its presence is what marks a dataset complete.
        (tmp / DATALIST_NAME).write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
        try:
            move_into_place(tmp, output_dir)
        except OSError:
            # A concurrent run may have finished the same dataset first; that one is as good as ours.
            if not reusable(output_dir, metadata):
                raise
            log.info("%s: another process wrote %s first; using it", short, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: dataset ready at %s", short, datalist_path)
    return datalist_path
