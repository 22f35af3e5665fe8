"""Turn downloaded datasets into the bundle's dataset folder and datalist (docs/prepare.md, docs/data.md).

    python -m scripts prepare mmwhs --source_dir /dl/mr_train --target_dir /dl/ct_train --output_dir /data/mmwhs_mr2ct
    python -m scripts prepare sifa --source_dir /dl/sifa/mr --target_dir /dl/sifa/ct --output_dir /data/sifa_mr2ct
    python -m scripts prepare brats --data_dir /dl/BraTS2018/HGG --source t2 --target flair --output_dir /data/brats

Every command reads and checks its input, splits it by patient, remaps the labels to the bundle's classes and
writes NIfTI volumes plus ``datalist.json`` (paths relative to the output folder, a ``metadata`` block with
what was done). Everything is written into a temporary sibling folder that replaces ``output_dir`` only once
complete, so a failed run never damages earlier output. Bad input raises :class:`PrepareError`, whose message
names the file and the fault; on the command line that is one ``ERROR: ...`` line and exit status 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import locale
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from scripts.generated import move_into_place
from scripts.validation import NIFTI_SUFFIXES, SPLITS

__all__ = [
    "BRATS_LABEL_MAP",
    "BRATS_MODALITIES",
    "DATALIST_NAME",
    "HEART_CLASS_NAMES",
    "MMWHS_LABEL_MAP",
    "MMWHS_STRUCTURES",
    "PrepareCommand",
    "PrepareError",
    "SIFA_LABEL_MAP",
    "SIFA_TEST_PATIENTS",
    "prepare_brats",
    "prepare_mmwhs",
    "prepare_sifa",
    "read_volume",
    "remap_labels",
    "sitk_to_ras",
]

logger = logging.getLogger(__name__)

DATALIST_NAME = "datalist.json"
PREPARE_VERSION = 1

HEART_CLASS_NAMES: tuple[str, ...] = ("background", "AA", "LAC", "LVC", "MYO")
BRATS_CLASS_NAMES: tuple[str, ...] = ("background", "whole_tumour")

# MMWHS 2017 label values and the structures they mark.
MMWHS_STRUCTURES: dict[int, str] = {0: "background", 205: "MYO", 420: "LAC", 500: "LVC", 550: "RAC", 600: "RVC",
                                    820: "AA", 850: "PA"}
# Raw MMWHS value -> bundle class (paper order 1 AA, 2 LAC, 3 LVC, 4 MYO); the other structures -> background.
MMWHS_LABEL_MAP: dict[int, int] = {0: 0, 820: 1, 420: 2, 500: 3, 205: 4, 550: 0, 600: 0, 850: 0}
# SIFA's ids (1 MYO, 2 LAC, 3 LVC, 4 AA) -> bundle class.
SIFA_LABEL_MAP: dict[int, int] = {0: 0, 4: 1, 2: 2, 3: 3, 1: 4}
# BraTS 2018 (1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour) -> whole tumour.
BRATS_LABEL_MAP: dict[int, int] = {0: 0, 1: 1, 2: 1, 4: 1}

# SIFA's (Chen et al.) test patients, used by most MMWHS cross-modality papers since.
SIFA_TEST_PATIENTS: dict[str, tuple[str, ...]] = {"ct": ("1003", "1008", "1014", "1019"),
                                                  "mr": ("1007", "1009", "1018", "1019")}
MMWHS_MODALITIES: tuple[str, ...] = ("mr", "ct")
BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


# Image and label affines may differ by this much (mm, per affine entry) and still count as one voxel grid.
AFFINE_ATOL = 1e-3

_ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_PAIR_RE = re.compile(r"^(?P<case>.+)_(?P<kind>image|label)$", re.IGNORECASE)
_MAX_LISTED = 8


class PrepareError(ValueError):
    """Bad input for data preparation; the message names the file (or flag) and the fault."""


# ----------------------------------------------------------------------------------------------- reading


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _suffix(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES + _ITK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def sitk_to_ras(image: sitk.Image, path: str | os.PathLike = "<image>") -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image as an array indexed ``[i, j, k]`` and the nibabel (RAS) voxel-to-world affine.

    ITK's physical space is LPS: ``p = origin + direction @ diag(spacing) @ (i, j, k)``. RAS negates the first
    two world axes, so the affine is ``diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]``; the array is
    ``GetArrayFromImage`` (indexed ``[k, j, i]``) transposed.

    Args:
        image: a 3D scalar SimpleITK image.
        path: where it came from, for error messages.

    Returns:
        ``(array, affine)`` with ``affine @ (i, j, k, 1)`` the RAS world position (mm) of ``array[i, j, k]``.

    Raises:
        PrepareError: the image is not 3D or not scalar.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PrepareError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                           "expected a scalar (grey-level or label) volume")
    if image.GetDimension() != 3:
        raise PrepareError(f"{path}: is a {image.GetDimension()}D image; expected a 3D volume")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return array, affine


def _read_nifti(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a damaged file
        raise PrepareError(f"{path}: cannot read it as NIfTI ({_describe(exc)})") from exc
    return array, affine


def _read_itk_file(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise PrepareError(f"{path}: cannot read it with SimpleITK ({_describe(exc)})") from exc
    return sitk_to_ras(image, path)


@contextlib.contextmanager
def _locale_kept() -> Iterator[None]:
    """GDCM switches the process locale to "C" while scanning DICOM; put it back, or every later text file
    opened with the default encoding would be read as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _read_dicom_series(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with _locale_kept():
        return _scan_dicom_series(folder)


def _scan_dicom_series(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise PrepareError(f"{folder}: cannot scan it for DICOM series ({_describe(exc)})") from exc
    if not series:
        raise PrepareError(f"{folder}: folder holds no readable DICOM series (expected one series of .dcm files)")
    if len(series) > 1:
        raise PrepareError(f"{folder}: folder holds {len(series)} DICOM series; put each series in its own folder")
    try:
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
        image = reader.Execute()
    except RuntimeError as exc:
        raise PrepareError(f"{folder}: cannot read its DICOM series ({_describe(exc)})") from exc
    return sitk_to_ras(image, folder)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3D volume and its RAS voxel-to-world affine.

    NIfTI (``.nii``, ``.nii.gz``) is read with nibabel; MHA / MHD and NRRD / NHDR files, and a folder holding
    one DICOM series, with SimpleITK (LPS geometry converted by :func:`sitk_to_ras`). Trailing singleton axes
    beyond the third are dropped.

    Args:
        path: the file, or the DICOM folder.

    Returns:
        ``(array, affine)``: the voxel array indexed ``[i, j, k]`` and its 4x4 affine.

    Raises:
        PrepareError: missing, unsupported or unreadable input, not 3D, or a degenerate affine.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif not path.exists():
        raise PrepareError(f"{path}: no such file")
    else:
        suffix = _suffix(path)
        if suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        elif suffix in _ITK_SUFFIXES:
            array, affine = _read_itk_file(path)
        else:
            raise PrepareError(f"{path}: unsupported file type (expected .nii / .nii.gz, .mha / .mhd, "
                               ".nrrd / .nhdr, or a folder holding one DICOM series)")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise PrepareError(f"{path}: has shape {tuple(array.shape)}; expected a 3D volume")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise PrepareError(f"{path}: its voxel-to-world affine is degenerate: {_fmt_affine(affine)}")
    return array, affine


def _read_npz(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ("arr_0", "arr_1") if key not in npz.files]
            if missing:
                raise PrepareError(f"{path}: has no {' / '.join(missing)} array (holds {sorted(npz.files)}); SIFA's "
                                   "volumes store the image as arr_0 and the label as arr_1")
            image, label = npz["arr_0"], npz["arr_1"]
    except PrepareError:
        raise
    except Exception as exc:  # zipfile, pickle-refusal and I/O errors for a damaged file
        raise PrepareError(f"{path}: cannot read it as a .npz archive ({_describe(exc)})") from exc
    for name, array in (("arr_0 (image)", image), ("arr_1 (label)", label)):
        if array.ndim != 3:
            raise PrepareError(f"{path}: {name} has shape {tuple(array.shape)}; expected a 3D volume")
    return image, label


# ----------------------------------------------------------------------------------- checks and geometry


def _fmt_affine(affine: np.ndarray) -> str:
    return json.dumps(np.round(np.asarray(affine)[:3], 4).tolist())


def _fmt_values(values: Sequence[float]) -> str:
    shown = [int(v) if float(v).is_integer() else float(v) for v in values[:_MAX_LISTED]]
    more = f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else ""
    return ", ".join(str(v) for v in shown) + more


def _check_pair(image_path: pathlib.Path, image: np.ndarray, image_affine: np.ndarray,
                label_path: pathlib.Path, label: np.ndarray, label_affine: np.ndarray | None) -> None:
    if image.shape != label.shape:
        raise PrepareError(f"{label_path}: label shape {tuple(label.shape)} does not match the shape "
                           f"{tuple(image.shape)} of its image {image_path}")
    if label_affine is not None and not np.allclose(image_affine, label_affine, rtol=1e-5, atol=AFFINE_ATOL):
        diff = float(np.abs(image_affine - label_affine).max())
        raise PrepareError(f"{label_path}: label affine {_fmt_affine(label_affine)} differs from the affine "
                           f"{_fmt_affine(image_affine)} of its image {image_path} (by up to {diff:.4g}); "
                           "image and label must share one voxel grid")


def remap_labels(label: np.ndarray, mapping: Mapping[int, int], path: str | os.PathLike, label_set: str,
                 hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Map raw label values to bundle classes, refusing any value the mapping does not know.

    Args:
        label: raw integer-valued label volume (any numeric dtype).
        mapping: raw value -> class id (0 for structures that become background).
        path: the label file, named in errors.
        label_set: name of the label set for errors, e.g. ``"MMWHS"``.
        hint: appended to the unknown-value error.

    Returns:
        ``(classes, foreground)``: the ``uint8`` class map and the boolean mask of raw non-zero voxels.

    Raises:
        PrepareError: non-numeric or non-integer values, or values outside ``mapping``.
    """
    known = ", ".join(str(v) for v in sorted(mapping))
    if label.dtype.kind == "b":
        label = label.view(np.uint8)
    elif label.dtype.kind not in "iuf":
        raise PrepareError(f"{path}: label has non-numeric type {label.dtype}")
    if label.size == 0:
        raise PrepareError(f"{path}: label volume is empty (shape {tuple(label.shape)})")
    if label.dtype.kind == "f":
        finite = np.isfinite(label)
        if not finite.all() or not np.array_equal(label, np.round(label)):
            bad = np.unique(label[~finite | (label != np.round(label))])
            raise PrepareError(f"{path}: label values must be integers; found {_fmt_values(bad.tolist())}")
    lo, hi = label.min(), label.max()
    top = max(mapping)
    if lo < 0 or hi > top:
        values = np.unique(label)
        unknown = [v for v in values.tolist() if v not in mapping]
        raise PrepareError(f"{path}: label values {_fmt_values(unknown)} are outside the {label_set} label set "
                           f"{{{known}}}{hint}")
    index = label.astype(np.int32, copy=False) if label.dtype.kind == "f" or label.dtype.itemsize > 4 else label
    present = np.zeros(top + 1, dtype=bool)
    present[index] = True
    unknown = [v for v in np.flatnonzero(present).tolist() if v not in mapping]
    if unknown:
        raise PrepareError(f"{path}: label values {_fmt_values(unknown)} are outside the {label_set} label set "
                           f"{{{known}}}{hint}")
    lut = np.zeros(top + 1, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut[index], index != 0


def _image_array(image: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """Image data in a NIfTI-friendly dtype: small integers kept, everything else float32."""
    if image.dtype.kind == "b":
        return image.astype(np.uint8)
    if image.dtype.kind in "iu" and image.dtype.itemsize <= 4:
        return image
    if image.dtype.kind in "iuf":
        return image.astype(np.float32)
    raise PrepareError(f"{path}: image has unsupported voxel type {image.dtype}")


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def _reorient_and_crop(image: np.ndarray, label: np.ndarray, foreground: np.ndarray, affine: np.ndarray, *,
                       crop_margin: int | None, label_path: pathlib.Path,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS reorientation (``nibabel.as_closest_canonical``), then the optional crop."""
    arrays = []
    canonical = None
    for array in (image, label, foreground.astype(np.uint8)):
        canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
        arrays.append(np.asanyarray(canonical.dataobj))
    affine = np.asarray(canonical.affine, dtype=np.float64)
    if crop_margin is not None:
        box = _bounding_box(arrays[2], crop_margin)
        if box is None:
            raise PrepareError(f"{label_path}: label has no foreground, so there is no heart to crop around; "
                               "check the label or pass --no_crop")
        arrays = [a[box] for a in arrays]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box], dtype=np.float64) + affine[:3, 3]
    return np.ascontiguousarray(arrays[0]), np.ascontiguousarray(arrays[1]), affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: pathlib.Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    gram = affine[:3, :3].T @ affine[:3, :3]
    if np.allclose(gram, np.diag(np.diag(gram)), atol=1e-6 * float(np.max(np.abs(gram)))):
        img.set_qform(affine, code=1)  # a qform can only hold a shear-free affine
    try:
        nib.save(img, str(path))
    except OSError as exc:
        raise PrepareError(f"{path}: cannot write it ({_describe(exc)})") from exc


# ------------------------------------------------------------------------------------------------ splits


def _patient_key(patient: str) -> tuple[int, int, str]:
    return (0, int(patient), patient) if patient.isdigit() else (1, 0, patient)


def _sorted(patients: Sequence[str] | set[str]) -> list[str]:
    return sorted(patients, key=_patient_key)


def _rng(seed: int, *words: str) -> np.random.Generator:
    # One independent, reproducible stream per purpose, so e.g. the CT draw does not depend on the MR folder.
    return np.random.default_rng([seed, *(zlib.crc32(w.encode()) for w in words)])


def _count(fraction: float, n: int) -> int:
    return 0 if fraction == 0 else max(1, int(np.floor(fraction * n + 0.5)))


def _draw(patients: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    ordered = _sorted(patients)
    return _sorted([ordered[i] for i in rng.permutation(len(ordered))[:count]])


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise PrepareError(f"--{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PrepareError(f"--seed must be a non-negative integer, got {seed!r}")
    return seed


def _load_split_file(path: pathlib.Path) -> dict[str, dict[str, list[str]]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read the split file ({_describe(exc)})") from exc
    except ValueError as exc:
        raise PrepareError(f"{path}: split file is not valid JSON ({_describe(exc)})") from exc
    example = '{"ct": {"test": ["1003", "1008"], "val": ["1010"]}, "mr": {"test": ["1007"]}}'
    if not isinstance(raw, dict) or not raw:
        raise PrepareError(f"{path}: split file must be a JSON object like {example}")
    out: dict[str, dict[str, list[str]]] = {}
    for modality, entry in raw.items():
        if modality not in MMWHS_MODALITIES:
            raise PrepareError(f"{path}: unknown modality {modality!r} in the split file; expected 'mr' and/or 'ct'")
        if isinstance(entry, list):
            entry = {"test": entry}
        if not isinstance(entry, dict) or not set(entry) <= {"test", "val"}:
            raise PrepareError(f"{path}: entry {modality!r} must be a list of test patients or an object with "
                               f"'test' and optional 'val' lists, like {example}")
        lists: dict[str, list[str]] = {}
        for role, ids in entry.items():
            if not isinstance(ids, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool)
                                                    for i in ids):
                raise PrepareError(f"{path}: {modality}.{role} must be a list of patient ids, got {ids!r}")
            lists[role] = [str(i) for i in ids]
        out[modality] = lists
    return out


@dataclass
class _SplitPlan:
    method: str  # "random", "sifa" or "file"
    lists: dict[str, dict[str, list[str]]]  # modality -> role -> patient ids (explicit methods only)
    origin: str  # named in errors: "--split sifa" or the split file


def _split_plan(split: str, split_file: str | os.PathLike | None) -> _SplitPlan:
    if split not in ("random", "sifa"):
        raise PrepareError(f"--split must be 'random' or 'sifa' (or give --split_file), got {split!r}")
    if split_file is not None:
        if split != "random":
            raise PrepareError("give either --split sifa or --split_file, not both")
        path = pathlib.Path(str(split_file)).expanduser().absolute()
        return _SplitPlan("file", _load_split_file(path), str(path))
    if split == "sifa":
        return _SplitPlan("sifa", {m: {"test": list(ids)} for m, ids in SIFA_TEST_PATIENTS.items()}, "--split sifa")
    return _SplitPlan("random", {}, "--split random")


def _explicit(plan: _SplitPlan, modality: str, role: str, patients: Sequence[str], folder: pathlib.Path,
              ) -> list[str] | None:
    if plan.method == "random":
        return None
    entry = plan.lists.get(modality)
    if entry is None:
        if role == "val":
            return None
        raise PrepareError(f"{plan.origin}: lists no test patients for {modality!r}")
    ids = entry.get(role)
    if ids is None:
        if role == "val":
            return None
        raise PrepareError(f"{plan.origin}: lists no 'test' patients for {modality!r}")
    missing = [p for p in ids if p not in patients]
    if missing:
        raise PrepareError(f"{plan.origin}: lists {modality} patient(s) {', '.join(missing)} that are not in "
                           f"{folder} (found {', '.join(_sorted(patients))})")
    return _sorted(set(ids))


def _heart_splits(plan: _SplitPlan, source: Sequence[str], target: Sequence[str], source_modality: str,
                  target_modality: str, source_dir: pathlib.Path, target_dir: pathlib.Path, seed: int,
                  test_fraction: float, val_fraction: float, hold_out_source_test: bool) -> dict[str, list[str]]:
    """Patients per split: source -> source_train (+ source_test), target -> target_train / _val / _test."""
    test = _explicit(plan, target_modality, "test", target, target_dir)
    if test is None:
        test = _draw(target, _count(test_fraction, len(target)), _rng(seed, "test", target_modality))
    rest = [p for p in _sorted(target) if p not in test]
    val = _explicit(plan, target_modality, "val", target, target_dir)
    if val is None:
        val = _draw(rest, _count(val_fraction, len(rest)), _rng(seed, "val", target_modality))
    elif set(val) & set(test):
        raise PrepareError(f"{plan.origin}: {target_modality} patient(s) {', '.join(_sorted(set(val) & set(test)))} "
                           "are listed as both test and val")
    train = [p for p in rest if p not in val]
    if not train:
        raise PrepareError(f"{target_dir}: no {target_modality} patients left for target_train: {len(target)} found, "
                           f"{len(test)} go to target_test and {len(val)} to target_val")
    splits = {"source_train": _sorted(source), "target_train": train, "target_val": val, "target_test": test}
    if hold_out_source_test:
        held = _explicit(plan, source_modality, "test", source, source_dir)
        if held is None:
            held = _draw(source, _count(test_fraction, len(source)), _rng(seed, "test", source_modality))
        splits["source_train"] = [p for p in _sorted(source) if p not in held]
        splits["source_test"] = held
        if not splits["source_train"]:
            raise PrepareError(f"{source_dir}: no {source_modality} patients left for source_train after holding out "
                               f"{len(held)} for source_test")
    return splits


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Item:
    """One volume to write: where it goes and where it comes from."""

    split: str
    stem: str  # output file stem, e.g. "ct_1003"
    patient: str
    modality: str
    image: pathlib.Path
    label: pathlib.Path


_Processor = Callable[[_Item], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _check_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[pathlib.Path],
                      ) -> pathlib.Path:
    out = pathlib.Path(str(output_dir)).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: output_dir exists and is not a folder")
    resolved = out.resolve()
    for folder in inputs:
        inp = folder.resolve()
        if resolved == inp or resolved in inp.parents:
            raise PrepareError(f"{out}: output_dir is, or contains, the input folder {folder}; "
                               "choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"{out}: output_dir exists and is not empty; pass --overwrite to replace it "
                           "(it is replaced only once the new dataset is complete)")
    return out


def _write_dataset(output_dir: pathlib.Path, items: Sequence[_Item], process: _Processor, metadata: dict,
                   target_labels: bool = True) -> pathlib.Path:
    """Every item processed and written, then the datalist; without ``target_labels`` no target label file is
    written or listed (target_val and target_test list images only, no target_train_labels), as a user without
    target labels has it."""
    dataset = metadata["dataset"]
    metadata["target_labels"] = bool(target_labels)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    except OSError as exc:
        raise PrepareError(f"{output_dir.parent}: cannot create the output folder there ({_describe(exc)})") from exc
    try:
        datalist: dict[str, Any] = {split: [] for split in SPLITS}
        target_train_labels = []
        for n, item in enumerate(items, 1):
            image, label, affine = process(item)
            (tmp / item.split).mkdir(exist_ok=True)
            entry = {"image": f"{item.split}/{item.stem}_image.nii.gz"}
            label_path = f"{item.split}/{item.stem}_label.nii.gz"
            _save_nifti(image, affine, tmp / entry["image"])
            if not target_labels and item.split.startswith("target"):
                datalist[item.split].append(entry)
            elif item.split == "target_train":
                _save_nifti(label, affine, tmp / label_path)
                datalist["target_train"].append(entry)
                target_train_labels.append({**entry, "label": label_path})
            else:
                _save_nifti(label, affine, tmp / label_path)
                datalist[item.split].append({**entry, "label": label_path})
            logger.info("prepare %s: [%d/%d] %s %s -> %s (shape %s, %s)", dataset, n, len(items), item.modality,
                        item.image.name, entry["image"], "x".join(map(str, image.shape)),
                        "".join(nib.aff2axcodes(affine)))
        if target_labels:
            datalist["target_train_labels"] = target_train_labels
        else:
            del datalist["target_train_labels"]
        if not datalist["source_test"]:  # listed only with --hold_out_source_test
            del datalist["source_test"]
        metadata["counts"] = {k: len(v) for k, v in datalist.items()}
        datalist["metadata"] = metadata
        # The datalist is written last: its presence is what marks a dataset complete.
        (tmp / DATALIST_NAME).write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, output_dir)
    except OSError as exc:
        raise PrepareError(f"{output_dir}: cannot write the dataset ({_describe(exc)})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepare %s: wrote %d volumes; datalist %s", dataset, len(items), output_dir / DATALIST_NAME)
    return output_dir / DATALIST_NAME


def _role(split: str) -> str:
    return "source" if split.startswith("source") else "target"


def _items(splits: Mapping[str, Sequence[str]], modalities: Mapping[str, str],
           paths: Callable[[str, str], tuple[pathlib.Path, pathlib.Path]],
           stem: Callable[[str, str], str]) -> list[_Item]:
    """The volumes to write; ``modalities`` maps each role ("source", "target") to its modality."""
    items = []
    for split, patients in splits.items():
        modality = modalities[_role(split)]
        for patient in patients:
            image, label = paths(split, patient)
            items.append(_Item(split, stem(modality, patient), patient, modality, image, label))
    return items


def _check_choice(flag: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise PrepareError(f"--{flag} must be one of {', '.join(choices)}; got {value!r}")
    return value.lower()


def _check_modalities(source: Any, target: Any, choices: Sequence[str], flags: tuple[str, str]) -> tuple[str, str]:
    source = _check_choice(flags[0], source, choices)
    target = _check_choice(flags[1], target, choices)
    if source == target:
        raise PrepareError(f"--{flags[0]} and --{flags[1]} are both {source!r}; they must differ")
    return source, target


def _input_dir(path: str | os.PathLike, flag: str) -> pathlib.Path:
    folder = pathlib.Path(str(path)).expanduser().absolute()
    if not folder.is_dir():
        raise PrepareError(f"{folder}: --{flag} {'is not a folder' if folder.exists() else 'does not exist'}")
    return folder


def _check_split_numbers(seed: Any, test_fraction: Any, val_fraction: Any) -> tuple[int, float, float]:
    return (_check_seed(seed), _check_fraction("test_fraction", test_fraction),
            _check_fraction("val_fraction", val_fraction))


def _heart_folders(source_dir: str | os.PathLike, target_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   overwrite: bool) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """The checked source, target and output folders of an MMWHS-style command (mmwhs, sifa)."""
    src_dir, tgt_dir = _input_dir(source_dir, "source_dir"), _input_dir(target_dir, "target_dir")
    if src_dir.resolve() == tgt_dir.resolve():
        raise PrepareError(f"{src_dir}: --source_dir and --target_dir are the same folder")
    return src_dir, tgt_dir, _check_output_dir(output_dir, overwrite, [src_dir, tgt_dir])


def _heart_split_metadata(plan: _SplitPlan, seed: int, test_fraction: float, val_fraction: float,
                          hold_out_source_test: bool) -> dict[str, Any]:
    return {"method": plan.method, "split_file": plan.origin if plan.method == "file" else None,
            "seed": seed, "test_fraction": test_fraction if plan.method == "random" else None,
            "val_fraction": val_fraction, "hold_out_source_test": bool(hold_out_source_test)}


def _metadata(dataset: str, modalities: Mapping[str, str], class_names: Sequence[str],
              label_map: Mapping[int, int], orientation: str, crop: dict[str, Any], split: dict[str, Any],
              patients: Mapping[str, Sequence[str]], inputs: dict[str, str]) -> dict[str, Any]:
    """The datalist's ``metadata`` block (docs/prepare.md), one layout for every command."""
    return {
        "generator": __name__, "version": PREPARE_VERSION, "dataset": dataset,
        "source_modality": modalities["source"], "target_modality": modalities["target"],
        "class_names": list(class_names),
        "label_map": {str(k): v for k, v in sorted(label_map.items())},
        "orientation": orientation, "crop": crop, "split": split, "patients": patients, "inputs": inputs,
    }


def _read_checked_pair(item: _Item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label and their affine, read from ``item``'s files and checked to share one voxel grid."""
    image, affine = read_volume(item.image)
    label, label_affine = read_volume(item.label)
    _check_pair(item.image, image, affine, item.label, label, label_affine)
    return image, label, affine


# ------------------------------------------------------------------------------------------------- MMWHS


def _patient_id(case: str) -> str:
    digits = re.findall(r"\d+", case)
    return digits[-1] if digits else case


def _modality_tag(name: str, choices: Sequence[str]) -> str | None:
    tokens = [t.lower() for t in re.split(r"[_\-.]", name)]
    found = [t for t in tokens if t in choices]
    return found[0] if len(set(found)) == 1 else None


def _check_tag(entry: pathlib.Path, name: str, modality: str, role: str) -> None:
    tag = _modality_tag(name, MMWHS_MODALITIES)
    if tag is not None and tag != modality:
        raise PrepareError(f"{entry}: its name says {tag.upper()} but it is in the {role} folder, whose modality "
                           f"is {modality.upper()} (--{role}_modality); swap the folders or set the modality flags")


def _scan_mmwhs(folder: pathlib.Path, role: str, modality: str) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """Patient id -> (image, label) for the ``*_image.*`` / ``*_label.*`` volumes directly in ``folder``."""
    tables: dict[str, dict[str, pathlib.Path]] = {"image": {}, "label": {}}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            stem = entry.name  # a DICOM series folder, e.g. mr_train_1001_image/
        else:
            suffix = _suffix(entry)
            if suffix is None:
                continue  # .raw companions of .mhd headers, READMEs, archives
            stem = entry.name[: -len(suffix)]
        match = _PAIR_RE.match(stem)
        if match is None:
            continue
        case, kind = match["case"], match["kind"].lower()
        _check_tag(entry, case, modality, role)
        patient = _patient_id(case)
        table = tables[kind]
        if patient in table:
            raise PrepareError(f"{folder}: duplicate patient id {patient}: {table[patient].name} and {entry.name}")
        table[patient] = entry
    images, labels = tables["image"], tables["label"]
    if not images and not labels:
        raise PrepareError(f"{folder}: empty {role} folder: no <case>_image / <case>_label volumes (NIfTI, MHA/MHD, "
                           "NRRD or DICOM-series folders) found, e.g. mr_train_1001_image.nii.gz")
    for patient in _sorted(images.keys() - labels.keys()):
        raise PrepareError(f"{images[patient]}: no label volume for patient {patient} in {folder} "
                           "(expected a matching <case>_label file)")
    for patient in _sorted(labels.keys() - images.keys()):
        raise PrepareError(f"{labels[patient]}: no image volume for patient {patient} in {folder} "
                           "(expected a matching <case>_image file)")
    return {p: (images[p], labels[p]) for p in _sorted(images.keys())}


def _check_aliases(label_aliases: Any) -> dict[int, int]:
    if label_aliases is None:
        return {}
    if not isinstance(label_aliases, Mapping):
        raise PrepareError(f"--label_aliases must be a mapping like '{{421: 420}}', got {label_aliases!r}")
    out = {}
    for raw, known in label_aliases.items():
        try:
            raw_i, known_i = int(raw), int(known)
        except (TypeError, ValueError):
            raise PrepareError(f"--label_aliases: {raw!r}: {known!r} is not an integer pair") from None
        if known_i not in MMWHS_LABEL_MAP or raw_i in MMWHS_LABEL_MAP or raw_i < 0:
            raise PrepareError(f"--label_aliases: {raw_i}: {known_i} must map a value outside the MMWHS label set "
                               f"onto one inside it ({', '.join(map(str, sorted(MMWHS_LABEL_MAP)))})")
        out[raw_i] = known_i
    return out


_ALIAS_HINT = ("; if such a value is a slip for a known structure, accept it with --label_aliases, "
               "e.g. --label_aliases '{421: 420}'")


def _crop_setting(no_crop: bool, crop_margin: Any) -> int | None:
    if no_crop:
        return None
    if isinstance(crop_margin, bool) or not isinstance(crop_margin, int) or crop_margin < 0:
        raise PrepareError(f"--crop_margin must be a non-negative integer (voxels), got {crop_margin!r}")
    return crop_margin


def prepare_mmwhs(
    *,
    source_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    source_modality: str = "mr",
    target_modality: str = "ct",
    split: str = "random",
    split_file: str | os.PathLike | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    hold_out_source_test: bool = False,
    crop_margin: int = 10,
    no_crop: bool = False,
    label_aliases: Mapping[int, int] | None = None,
    overwrite: bool = False,
    without_target_labels: bool = False,
) -> pathlib.Path:
    """MMWHS 2017: mr_train / ct_train folders (<case>_image / <case>_label volumes) -> dataset + datalist.

    Labels 820 AA, 420 LAC, 500 LVC, 205 MYO become 1-4 (the paper's order); 550 RAC, 600 RVC, 850 PA and 0
    become background; any other value is an error. Volumes are reoriented to RAS (nibabel's
    as_closest_canonical) and, unless --no_crop, cropped to the bounding box of the label's foreground (the
    whole heart, all seven structures) plus --crop_margin voxels, identically for image and label: the crop
    uses the labels, as SIFA's preprocessing did. Every source patient goes to source_train (unless
    --hold_out_source_test); target patients are split into target_test, target_val (carved from the training
    patients) and target_train (unlabelled in the datalist). Comparable with the paper (SIFA's heart crop at one
    in-plane scale): train and infer on the result with --pixel_spacing "[1.0, 1.0]". See docs/prepare.md.

    Args:
        source_dir: folder of the labelled source modality, e.g. mr_train (files like mr_train_1001_image.nii.gz
            and mr_train_1001_label.nii.gz; .mha/.mhd, .nrrd/.nhdr and DICOM-series folders are read too).
        target_dir: folder of the target modality, e.g. ct_train, same layout.
        output_dir: dataset folder to write; must be empty or absent unless --overwrite.
        source_modality: 'mr' or 'ct', the modality of source_dir (paper: mr).
        target_modality: 'mr' or 'ct', the modality of target_dir (paper: ct).
        split: 'random' (seeded, --test_fraction of the target patients to target_test) or 'sifa' (SIFA's
            test patients, CT 1003, 1008, 1014, 1019 and MR 1007, 1009, 1018, 1019).
        split_file: JSON file naming the test (and optionally val) patients per modality, overriding --split
            (format in docs/prepare.md).
        seed: seed of every random choice (test patients with --split random, validation patients).
        test_fraction: share of the target patients that go to target_test with --split random (default 0.2).
        val_fraction: share of the remaining target training patients moved to target_val, at least one when
            non-zero (default 0.1, i.e. 2 of MMWHS's 16); ignored when --split_file lists the target's val patients.
        hold_out_source_test: move the source modality's test patients (same rule as the target's) from
            source_train to a labelled source_test split, for reference evaluation.
        crop_margin: margin in voxels around the label's foreground bounding box (default 10).
        no_crop: keep whole volumes (no crop); also --no-crop.
        label_aliases: extra raw values accepted as a known MMWHS value, e.g. '{421: 420}' for a LAC voxel
            written 421; without it any value outside the MMWHS set is an error.
        overwrite: replace a non-empty output_dir (only once the new dataset is complete).
        without_target_labels: write and list no target label (target_val / target_test images only): the
            datalist of a user without target labels, whose models are selected label-free (docs/selection.md).

    Returns:
        Path of ``output_dir/datalist.json``.

    Raises:
        PrepareError: bad flags or bad input; the message names the file and the fault.
    """
    source_modality, target_modality = _check_modalities(source_modality, target_modality, MMWHS_MODALITIES,
                                                         ("source_modality", "target_modality"))
    seed, test_fraction, val_fraction = _check_split_numbers(seed, test_fraction, val_fraction)
    margin = _crop_setting(no_crop, crop_margin)
    aliases = _check_aliases(label_aliases)
    plan = _split_plan(split, split_file)
    src_dir, tgt_dir, out = _heart_folders(source_dir, target_dir, output_dir, overwrite)

    pairs = {"source": _scan_mmwhs(src_dir, "source", source_modality),
             "target": _scan_mmwhs(tgt_dir, "target", target_modality)}
    splits = _heart_splits(plan, list(pairs["source"]), list(pairs["target"]), source_modality, target_modality,
                           src_dir, tgt_dir, seed, test_fraction, val_fraction, hold_out_source_test)
    mapping = dict(MMWHS_LABEL_MAP)
    mapping.update({raw: MMWHS_LABEL_MAP[known] for raw, known in aliases.items()})

    def process(item: _Item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, label, affine = _read_checked_pair(item)
        classes, foreground = remap_labels(label, mapping, item.label, "MMWHS", _ALIAS_HINT)
        return _reorient_and_crop(_image_array(image, item.image), classes, foreground, affine, crop_margin=margin,
                                  label_path=item.label)

    modalities = {"source": source_modality, "target": target_modality}
    items = _items(splits, modalities, lambda s, p: pairs[_role(s)][p], lambda m, p: f"{m}_{p}")
    crop = ({"enabled": False} if margin is None else
            {"enabled": True, "margin_voxels": margin, "box_from": "label foreground (whole heart, raw != 0)"})
    metadata = _metadata("mmwhs", modalities, HEART_CLASS_NAMES, mapping, "RAS", crop,
                         _heart_split_metadata(plan, seed, test_fraction, val_fraction, hold_out_source_test),
                         splits, {"source_dir": str(src_dir), "target_dir": str(tgt_dir)})
    return _write_dataset(out, items, process, metadata, target_labels=not without_target_labels)


# -------------------------------------------------------------------------------------------------- SIFA


def _scan_npz(folder: pathlib.Path, role: str, modality: str) -> dict[str, pathlib.Path]:
    found: dict[str, pathlib.Path] = {}
    for entry in sorted(folder.glob("*.npz")):
        if entry.name.startswith("."):
            continue
        _check_tag(entry, entry.stem, modality, role)
        patient = _patient_id(entry.stem)
        if patient in found:
            raise PrepareError(f"{folder}: duplicate patient id {patient}: {found[patient].name} and {entry.name}")
        found[patient] = entry
    if not found:
        raise PrepareError(f"{folder}: empty {role} folder: no .npz volumes found (SIFA's release: one .npz per "
                           "patient with arr_0 image and arr_1 label)")
    return found


def prepare_sifa(
    *,
    source_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    source_modality: str = "mr",
    target_modality: str = "ct",
    split: str = "random",
    split_file: str | os.PathLike | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    hold_out_source_test: bool = False,
    overwrite: bool = False,
    without_target_labels: bool = False,
) -> pathlib.Path:
    """SIFA's preprocessed MMWHS release (.npz volumes: arr_0 image, arr_1 label) -> dataset + datalist.

    SIFA's label ids 1 MYO, 2 LAC, 3 LVC, 4 AA are remapped to the bundle's 1 AA, 2 LAC, 3 LVC, 4 MYO; other
    values are an error. The volumes are already cropped and resampled by SIFA and carry no geometry: they are
    written as NIfTI with an identity affine (1 mm voxels, array axes as stored; SIFA slices the last axis),
    without reorientation or crop. Patient ids are the last number in each file name (image_ct_1003.npz ->
    1003); splits follow the same rules as `prepare mmwhs`. See docs/prepare.md.

    Args:
        source_dir: folder of the source modality's .npz volumes.
        target_dir: folder of the target modality's .npz volumes.
        output_dir: dataset folder to write; must be empty or absent unless --overwrite.
        source_modality: 'mr' or 'ct', the modality of source_dir (paper: mr).
        target_modality: 'mr' or 'ct', the modality of target_dir (paper: ct).
        split: 'random' (seeded, --test_fraction of the target patients to target_test) or 'sifa' (SIFA's
            test patients, CT 1003, 1008, 1014, 1019 and MR 1007, 1009, 1018, 1019).
        split_file: JSON file naming the test (and optionally val) patients per modality, overriding --split
            (format in docs/prepare.md).
        seed: seed of every random choice.
        test_fraction: share of the target patients that go to target_test with --split random (default 0.2).
        val_fraction: share of the remaining target training patients moved to target_val (default 0.1).
        hold_out_source_test: move the source modality's test patients to a labelled source_test split.
        overwrite: replace a non-empty output_dir (only once the new dataset is complete).
        without_target_labels: write and list no target label (target_val / target_test images only): the
            datalist of a user without target labels, whose models are selected label-free (docs/selection.md).

    Returns:
        Path of ``output_dir/datalist.json``.

    Raises:
        PrepareError: bad flags or bad input; the message names the file and the fault.
    """
    source_modality, target_modality = _check_modalities(source_modality, target_modality, MMWHS_MODALITIES,
                                                         ("source_modality", "target_modality"))
    seed, test_fraction, val_fraction = _check_split_numbers(seed, test_fraction, val_fraction)
    plan = _split_plan(split, split_file)
    src_dir, tgt_dir, out = _heart_folders(source_dir, target_dir, output_dir, overwrite)
    files = {"source": _scan_npz(src_dir, "source", source_modality),
             "target": _scan_npz(tgt_dir, "target", target_modality)}
    splits = _heart_splits(plan, list(files["source"]), list(files["target"]), source_modality, target_modality,
                           src_dir, tgt_dir, seed, test_fraction, val_fraction, hold_out_source_test)

    def process(item: _Item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, label = _read_npz(item.image)
        _check_pair(item.image, image, np.eye(4), item.label, label, None)
        classes, _ = remap_labels(label, SIFA_LABEL_MAP, item.label, "SIFA")
        return np.ascontiguousarray(_image_array(image, item.image)), classes, np.eye(4)

    def paths(split_name: str, patient: str) -> tuple[pathlib.Path, pathlib.Path]:
        path = files[_role(split_name)][patient]
        return path, path

    modalities = {"source": source_modality, "target": target_modality}
    items = _items(splits, modalities, paths, lambda m, p: f"{m}_{p}")
    metadata = _metadata("sifa", modalities, HEART_CLASS_NAMES, SIFA_LABEL_MAP, "as stored by SIFA (identity affine)",
                         {"enabled": False, "note": "SIFA's volumes are already cropped around the heart"},
                         _heart_split_metadata(plan, seed, test_fraction, val_fraction, hold_out_source_test),
                         splits, {"source_dir": str(src_dir), "target_dir": str(tgt_dir)})
    return _write_dataset(out, items, process, metadata, target_labels=not without_target_labels)


# ------------------------------------------------------------------------------------------------- BraTS


def _nifti_in(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for suffix in NIFTI_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _scan_brats(data_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Case id -> case folder, for every ``<case>_seg.nii[.gz]`` under ``data_dir`` (HGG/, LGG/ or both)."""
    cases: dict[str, pathlib.Path] = {}
    for seg in sorted(data_dir.rglob("*_seg.nii*")):
        suffix = _suffix(seg)
        if suffix not in NIFTI_SUFFIXES or seg.name.startswith("."):
            continue
        case = seg.name[: -len(suffix)][: -len("_seg")]
        if case in cases:
            raise PrepareError(f"{data_dir}: duplicate BraTS case id {case}: {cases[case]} and {seg.parent}")
        cases[case] = seg.parent
    if not cases:
        raise PrepareError(f"{data_dir}: empty data folder: no BraTS cases found (expected <case>/<case>_seg.nii.gz "
                           "next to <case>_t1, _t1ce, _t2 and _flair)")
    return cases


def prepare_brats(
    *,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    source: str = "t2",
    target: str = "flair",
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    without_target_labels: bool = False,
) -> pathlib.Path:
    """BraTS 2018 case folders (<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz) -> whole-tumour dataset + datalist.

    Labels 1, 2, 4 become 1 (whole tumour); other values are an error. The data are unpaired, as in the paper:
    the cases are shuffled with --seed and split into two disjoint halves, the first used only as source (its
    --source images with labels, all in source_train), the second only as target (its --target images), split
    into target_test, target_val and target_train. Volumes are reoriented to RAS; no crop. See docs/prepare.md.

    Args:
        data_dir: folder holding the case folders (e.g. BraTS2018/HGG; searched recursively, so the folder above
            HGG and LGG works too).
        output_dir: dataset folder to write; must be empty or absent unless --overwrite.
        source: source modality, one of t1, t1ce, t2, flair (paper t2).
        target: target modality, one of t1, t1ce, t2, flair (paper t1, t1ce and flair, one run each).
        seed: seed of the source / target halves and of the target test and validation draws.
        test_fraction: share of the target half that goes to target_test (default 0.2).
        val_fraction: share of the remaining target cases moved to target_val (default 0.1).
        overwrite: replace a non-empty output_dir (only once the new dataset is complete).
        without_target_labels: write and list no target label (target_val / target_test images only): the
            datalist of a user without target labels, whose models are selected label-free (docs/selection.md).

    Returns:
        Path of ``output_dir/datalist.json``.

    Raises:
        PrepareError: bad flags or bad input; the message names the file and the fault.
    """
    source, target = _check_modalities(source, target, BRATS_MODALITIES, ("source", "target"))
    seed, test_fraction, val_fraction = _check_split_numbers(seed, test_fraction, val_fraction)
    root = _input_dir(data_dir, "data_dir")
    out = _check_output_dir(output_dir, overwrite, [root])
    cases = _scan_brats(root)
    if len(cases) < 2:
        raise PrepareError(f"{root}: found {len(cases)} BraTS case; need at least 2 (disjoint source and target)")

    shuffled = [_sorted(cases)[i] for i in _rng(seed, "brats-halves").permutation(len(cases))]
    source_cases, target_cases = _sorted(shuffled[: len(cases) // 2]), _sorted(shuffled[len(cases) // 2:])
    test = _draw(target_cases, _count(test_fraction, len(target_cases)), _rng(seed, "test", target))
    rest = [c for c in target_cases if c not in test]
    val = _draw(rest, _count(val_fraction, len(rest)), _rng(seed, "val", target))
    train = [c for c in rest if c not in val]
    if not train:
        raise PrepareError(f"{root}: no cases left for target_train: {len(target_cases)} target cases, {len(test)} "
                           f"go to target_test and {len(val)} to target_val")
    splits = {"source_train": source_cases, "target_train": train, "target_val": val, "target_test": test}
    modalities = {"source": source, "target": target}

    files: dict[tuple[str, str], tuple[pathlib.Path, pathlib.Path]] = {}
    for split_name, split_cases in splits.items():
        modality = modalities[_role(split_name)]
        for case in split_cases:
            found = {}
            for kind in (modality, "seg"):
                found[kind] = _nifti_in(cases[case], f"{case}_{kind}")
                if found[kind] is None:
                    raise PrepareError(f"{cases[case] / (case + '_' + kind + '.nii.gz')}: missing file of BraTS case "
                                       f"{case} ({kind})")
            files[(split_name, case)] = (found[modality], found["seg"])

    def process(item: _Item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, label, affine = _read_checked_pair(item)
        classes, foreground = remap_labels(label, BRATS_LABEL_MAP, item.label, "BraTS")
        return _reorient_and_crop(_image_array(image, item.image), classes, foreground, affine, crop_margin=None,
                                  label_path=item.label)

    items = _items(splits, modalities, lambda s, c: files[(s, c)], lambda m, c: f"{c}_{m}")
    metadata = _metadata("brats", modalities, BRATS_CLASS_NAMES, BRATS_LABEL_MAP, "RAS", {"enabled": False},
                         {"method": "random disjoint halves", "split_file": None, "seed": seed,
                          "test_fraction": test_fraction, "val_fraction": val_fraction},
                         splits, {"data_dir": str(root)})
    return _write_dataset(out, items, process, metadata, target_labels=not without_target_labels)


# ---------------------------------------------------------------------------------------------------- CLI


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.setLevel(logging.INFO)


def _command(fn: Callable[..., pathlib.Path]) -> Callable[..., str]:
    """A prepare function as a CLI command: progress on, PrepareError -> one ``ERROR:`` line and exit 2."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> str:
        _configure_logging()
        try:
            return str(fn(*args, **kwargs))
        except PrepareError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return command


class PrepareCommand:
    """Turn downloaded data into the bundle's dataset folder and datalist.json (docs/prepare.md).

    Commands (`python -m scripts prepare COMMAND --help` lists each one's flags):

      mmwhs  MMWHS 2017 mr_train / ct_train folders -> classes 1 AA, 2 LAC, 3 LVC, 4 MYO, RAS, optional
             heart crop, patient-level split (seeded 80/20, SIFA's test patients or a split file).
      sifa   SIFA's preprocessed .npz volumes (arr_0 image, arr_1 label) -> the same classes, identity affine.
      brats  BraTS 2018 case folders -> whole tumour; one modality as source, another as target, on
             disjoint halves of the cases.

    The output folder gets one NIfTI image / label pair per volume under source_train/, target_train/,
    target_val/, target_test/ and datalist.json (paths relative to it, plus a metadata block). It is written
    to a temporary sibling folder and moved into place at the end. Bad input prints one `ERROR: ...` line
    naming the file and exits with status 2, leaving any existing output untouched.
    """

    mmwhs = staticmethod(_command(prepare_mmwhs))
    sifa = staticmethod(_command(prepare_sifa))
    brats = staticmethod(_command(prepare_brats))
