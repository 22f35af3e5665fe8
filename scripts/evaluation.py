"""Scores predicted 3D label maps against the labels, per volume and class, as the paper's Tables II and III:
Dice (%), ASD (voxel and mm), HD and HD95 (mm). ``configs/evaluate.yaml`` runs :class:`VolumeEvaluation`;
docs/evaluation.md has the definitions, the file-pairing rule and the empty-mask conventions.

Outputs in ``output_dir``: ``metrics.csv`` (one row per volume and class), ``summary.md`` (mean ± std and misses over
volumes, each class and the average), ``summary.json`` (the same numbers) and, with ``image_dir``,
``overlays/<volume>.png``. Every file is written to a temporary name and renamed, and nothing is written before
every volume has been scored, so a failed evaluation leaves an earlier one intact.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.metrics import METRIC_NAMES, class_metrics
from scripts.validation import NIFTI_SUFFIXES

__all__ = ["CSV_COLUMNS", "VolumePair", "VolumeEvaluation", "check_shapes", "format_summary", "load_label_map",
           "pair_files", "save_overlay", "summarise", "volume_key"]

logger = logging.getLogger("dsan")

CSV_COLUMNS = ("volume", "class", *METRIC_NAMES, "class_name")
METRIC_LABELS = {"dice": "Dice (%)", "asd_voxel": "ASD (voxel)", "asd_mm": "ASD (mm)", "hd_mm": "HD (mm)",
                 "hd95_mm": "HD95 (mm)"}
SURFACE_METRICS = ("asd_voxel", "asd_mm", "hd_mm", "hd95_mm")
AVERAGE = "average"
# the name suffix each kind of file may carry; the rest of the name pairs the files (docs/evaluation.md)
ROLE_SUFFIXES = {"pred": ("_pred", "_seg"), "label": ("_label",), "image": ("_image",)}
# files of another kind that may share a folder with the labels or the images (MMWHS and the demo data keep
# X_image and X_label side by side) are skipped
SKIPPED_SUFFIXES = {"pred": (), "label": ("_image",), "image": ("_label", "_pred", "_seg")}
COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#9a6324"]


@dataclass(frozen=True)
class VolumePair:
    """One evaluated volume: its name and the prediction, label and (optional) image files."""

    name: str
    pred: Path
    label: Path
    image: Path | None = None


def volume_key(file_name: str, role: str) -> str | None:
    """The name that pairs a file with the files of the other kinds, or None if the file is not of ``role``.

    The extension (``.nii.gz`` / ``.nii``) is dropped, then one role suffix: ``_pred`` or ``_seg`` for a
    prediction (followed by ``_image``, so MONAI's ``X_image_seg.nii.gz`` pairs with ``X_label.nii.gz``),
    ``_label`` for a label, ``_image`` for an image. ``X.nii.gz`` pairs with ``X.nii.gz`` in every folder. In a
    label folder ``_image`` files are skipped, in an image folder ``_label``, ``_pred`` and ``_seg`` files; where
    a folder holds both ``X.nii.gz`` and ``X<role suffix>.nii.gz``, the suffixed file is taken.
    """
    stem = _stem(file_name)
    if not stem or stem.endswith(SKIPPED_SUFFIXES[role]):
        return None
    for suffix in ROLE_SUFFIXES[role]:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    if role == "pred" and stem.endswith("_image") and len(stem) > len("_image"):
        stem = stem[: -len("_image")]
    return stem


def _stem(file_name: str) -> str | None:
    return next((file_name[: -len(s)] for s in NIFTI_SUFFIXES if file_name.endswith(s)), None)


def _index(folder: str | os.PathLike | None, role: str, recursive: bool = False) -> dict[str, Path]:
    if folder is None:
        raise ValueError(f"{role}_dir is not set: pass --{role}_dir DIR")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{role}_dir {folder} is not a folder")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        key = volume_key(path.name, role) if path.is_file() else None
        if key is not None:
            found.setdefault(key, []).append(path)
    for key, paths in found.items():  # X_label.nii.gz wins over X.nii.gz, e.g. images and bare labels in one folder
        suffixed = [p for p in paths if volume_key(p.name, role) != _stem(p.name)]
        if len(paths) > 1 and len(suffixed) == 1:
            found[key] = suffixed
    clashes = {k: v for k, v in found.items() if len(v) > 1}
    if clashes:
        listing = "; ".join(f"{k}: {', '.join(str(p) for p in v)}" for k, v in clashes.items())
        raise ValueError(f"{role}_dir {folder}: several files pair under one name ({listing})")
    return {k: v[0] for k, v in found.items()}


def pair_files(
    pred_dir: str | os.PathLike, label_dir: str | os.PathLike, image_dir: str | os.PathLike | None = None
) -> list[VolumePair]:
    """Pairs every prediction in ``pred_dir`` (searched recursively, so MONAI's ``SaveImage`` layout
    ``<name>/<name>_seg.nii.gz`` works) with the label of the same name in ``label_dir`` and, if ``image_dir``
    is given, the image of that name (see :func:`volume_key`).

    Raises:
        ValueError: no prediction found, or a prediction has no label (one error listing them all).

    Labels without a prediction, and missing images, are logged as warnings.
    """
    preds = _index(pred_dir, "pred", recursive=True)
    labels = _index(label_dir, "label")
    images = _index(image_dir, "image") if image_dir is not None else {}
    if not preds:
        raise ValueError(f"no prediction (.nii.gz / .nii) in pred_dir {pred_dir}")
    unpaired = sorted(set(preds) - set(labels))
    if unpaired:
        raise ValueError(
            f"{len(unpaired)} of {len(preds)} predictions have no label in {label_dir} (a prediction X.nii.gz, "
            f"X_pred.nii.gz or X_seg.nii.gz pairs with the label X.nii.gz or X_label.nii.gz): "
            + ", ".join(str(preds[k]) for k in unpaired))
    unscored = sorted(set(labels) - set(preds))
    if unscored:
        logger.warning("%d labels in %s have no prediction and are not evaluated: %s", len(unscored), label_dir,
                       ", ".join(labels[k].name for k in unscored))
    if image_dir is not None:
        no_image = sorted(set(preds) - set(images))
        if no_image:
            logger.warning("%d volumes have no image in %s, so no overlay: %s", len(no_image), image_dir,
                           ", ".join(no_image))
    return [VolumePair(k, preds[k], labels[k], images.get(k)) for k in sorted(preds)]


def _spatial_shape(img: nib.spatialimages.SpatialImage) -> tuple[int, ...]:
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # a trailing channel/time axis of size 1
        shape = shape[:-1]
    return shape


def check_shapes(pairs: Sequence[VolumePair]) -> None:
    """Raises one ValueError naming every pair of files whose (header) shapes differ or are not 3D."""
    problems = []
    for pair in pairs:
        label_shape = _spatial_shape(nib.load(str(pair.label)))
        if len(label_shape) != 3:
            problems.append(f"{pair.label} is not a 3D volume (shape {label_shape})")
        for other in (pair.pred, pair.image):
            if other is not None and _spatial_shape(nib.load(str(other))) != label_shape:
                problems.append(f"{other} has shape {_spatial_shape(nib.load(str(other)))} but {pair.label} has "
                                f"shape {label_shape}")
    if problems:
        raise ValueError("volumes are compared voxel by voxel, so shapes must match: " + "; ".join(problems))


def load_label_map(path: str | os.PathLike, num_classes: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """A 3D integer label map and its voxel size (the header's zooms, mm).

    Raises:
        ValueError: the file is not 3D, or holds values other than the integers ``0 .. num_classes - 1``.
    """
    img = nib.load(str(path))
    shape = _spatial_shape(img)
    if len(shape) != 3:
        raise ValueError(f"{path} is not a 3D volume (shape {tuple(img.shape)})")
    data = np.asanyarray(img.dataobj).reshape(shape)
    labels = np.rint(data).astype(np.int64) if np.issubdtype(data.dtype, np.floating) else data.astype(np.int64)
    values = np.unique(labels)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size or (np.issubdtype(data.dtype, np.floating) and not np.array_equal(labels, data)):
        raise ValueError(f"{path} must hold the class ids 0 .. {num_classes - 1}; it holds "
                         f"{np.unique(data)[:12].tolist()}{' ...' if values.size > 12 else ''}")
    return labels, tuple(float(z) for z in img.header.get_zooms()[:3])


def _volume_stats(values: Sequence[float]) -> dict:
    """Mean ± std over the finite values, with the misses (inf: the structure in only one of prediction and label)
    and the NaNs (in neither) counted beside them rather than hidden."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,  # population std (ddof 0), as SIFA's script
        "n": int(finite.size),
        "missed": int(np.isinf(values).sum()),
        "nan": int(np.isnan(values).sum()),
        "num_volumes": int(values.size),
    }


def _volume_average(values: Sequence[float]) -> float:
    """A volume's mean over classes: NaN classes (absent from both masks) left out; inf if any class is inf, so
    a volume that misses one structure is a miss of the average too, not a mean over the structures it found."""
    values = np.asarray(values, dtype=np.float64)
    if np.isinf(values).any():
        return math.inf
    return float(np.nanmean(values)) if (~np.isnan(values)).any() else math.nan


def summarise(rows: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Mean ± std over volumes of each metric, per class and for the average over classes, plus which volumes
    had an empty prediction, an empty label, or neither mask (the inf and NaN cells).

    ``rows`` are :class:`VolumeEvaluation`'s rows (CSV columns plus ``pred_empty`` / ``label_empty``). Each cell
    is ``{mean, std, n, missed, nan, num_volumes}``: mean and std over the ``n`` finite values, ``missed`` the
    volumes with an inf value (ASD/HD of a structure in only one of prediction and label), ``nan`` those with the
    class in neither, out of ``num_volumes``. The average column is the mean over volumes of each volume's mean
    over classes, where a volume with an inf class is inf (a miss of the average) and classes absent from both
    masks are skipped.
    """
    volumes = sorted({r["volume"] for r in rows})
    by_volume = {v: {r["class"]: r for r in rows if r["volume"] == v} for v in volumes}
    classes = list(range(1, len(class_names) + 1))
    metrics = {}
    for metric in METRIC_NAMES:
        per_class = {name: _volume_stats([by_volume[v][c][metric] for v in volumes if c in by_volume[v]])
                     for c, name in zip(classes, class_names)}
        averages = [_volume_average([r[metric] for r in by_volume[v].values()]) for v in volumes]
        metrics[metric] = {**per_class, AVERAGE: _volume_stats(averages)}
    empty = {}
    for c, name in zip(classes, class_names):
        class_rows = [by_volume[v][c] for v in volumes if c in by_volume[v]]
        empty[name] = {
            "empty_prediction": [r["volume"] for r in class_rows if r["pred_empty"] and not r["label_empty"]],
            "empty_label": [r["volume"] for r in class_rows if r["label_empty"] and not r["pred_empty"]],
            "both_empty": [r["volume"] for r in class_rows if r["pred_empty"] and r["label_empty"]],
        }
    return {"num_volumes": len(volumes), "volumes": volumes, "class_names": list(class_names),
            "units": {m: METRIC_LABELS[m] for m in METRIC_NAMES}, "metrics": metrics, "empty": empty}


def _volumes(n: int) -> str:
    return f"{n} volume" if n == 1 else f"{n} volumes"


def _cell(stats: dict) -> str:
    """mean ± std, then "(n=k)" when classes absent from both masks shrink the mean, and the misses, so that a
    missed structure shows in the very cell whose mean it is not part of."""
    cell = "n/a" if stats["mean"] is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    notes = [f"n={stats['n']}"] if stats["nan"] and stats["mean"] is not None else []
    if stats["missed"]:
        notes.append(f"{stats['missed']} of {_volumes(stats['num_volumes'])} missed")
    return f"{cell} ({'; '.join(notes)})" if notes else cell


def format_summary(summary: dict) -> str:
    """The Markdown of ``summary.md``: the table (rows = metrics, columns = classes and the average, cells
    mean ± std over volumes), the number of volumes, and one line per class with empty masks."""
    names, n = summary["class_names"], summary["num_volumes"]
    lines = [
        f"| | {' | '.join(names)} | Average |",
        "|---" * (len(names) + 2) + "|",
    ]
    for metric in METRIC_NAMES:
        stats = summary["metrics"][metric]
        lines.append(f"| {METRIC_LABELS[metric]} | "
                     + " | ".join(_cell(stats[k]) for k in [*names, AVERAGE]) + " |")
    lines += [
        "",
        f"Volumes: {n}. Cells: mean ± std (population) over the volumes with a finite value; \"k of {n} volumes "
        "missed\": k volumes where the structure is in only one of prediction and label (ASD/HD inf, listed "
        "below), not in the mean; \"(n=k)\": the mean is over k volumes because the others have the class in "
        "neither mask (NaN).",
        "Average: each volume's mean over classes, then mean ± std over volumes; a volume that misses any class "
        "is a miss of the average (its ASD/HD average is inf, not the mean of the classes it found).",
        "",
    ]
    notes = []
    for name in names:
        empty = summary["empty"][name]
        if empty["empty_prediction"]:
            notes.append(f"{name}: {_volumes(len(empty['empty_prediction']))} with an empty prediction (ASD/HD inf, "
                         f"excluded from the mean; Dice 0, included): {', '.join(empty['empty_prediction'])}")
        if empty["empty_label"]:
            notes.append(f"{name}: {_volumes(len(empty['empty_label']))} with an empty label but a non-empty "
                         f"prediction (ASD/HD inf, excluded from the mean; Dice 0, included): "
                         f"{', '.join(empty['empty_label'])}")
        if empty["both_empty"]:
            notes.append(f"{name}: {_volumes(len(empty['both_empty']))} with the class in neither prediction nor "
                         f"label (Dice and ASD/HD NaN, excluded from every mean): {', '.join(empty['both_empty'])}")
    lines += [f"- {note}" for note in notes] if notes else [
        f"No empty prediction or label: every cell is over all {_volumes(n)}."]
    return "\n".join(lines) + "\n"


def _csv_value(value: object) -> object:
    return round(value, 6) if isinstance(value, float) and math.isfinite(value) else value


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _json_safe(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def save_overlay(
    image: np.ndarray, pred: np.ndarray, label: np.ndarray, path: str | os.PathLike, class_names: Sequence[str],
    num_slices: int = 3, title: str = "",
) -> Path:
    """A PNG with one row per slice: image | prediction | label, classes colour-coded with a legend.

    The slices are the ``num_slices`` along the third array axis with the most label foreground (ties: more
    predicted foreground, then the lower index), shown in index order, transposed so that the first array axis
    runs left to right. Written to a temporary name and renamed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the object API: no pyplot global state
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    k = max(1, min(int(num_slices), label.shape[2]))
    label_fg, pred_fg = (label > 0).sum(axis=(0, 1)), (pred > 0).sum(axis=(0, 1))
    order = np.lexsort((np.arange(label.shape[2]), -pred_fg, -label_fg))
    slices = sorted(order[:k].tolist())
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(class_names))]
    cmap = ListedColormap(colours)
    finite = image[np.isfinite(image)]
    vmin, vmax = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))

    fig = Figure(figsize=(3 * 2.6, k * 2.6 + 0.9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(k, 3))
    for row, z in zip(axes, slices):
        for ax, (panel, mask) in zip(row, (("image", None), ("prediction", pred), ("label", label))):
            ax.imshow(image[:, :, z].T, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if mask is not None:
                ax.imshow(np.ma.masked_equal(mask[:, :, z].T, 0), cmap=cmap, vmin=0.5,
                          vmax=len(class_names) + 0.5, alpha=0.55, interpolation="nearest")
            ax.set_title(f"{panel}, slice {z}", fontsize=8)
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    handles = [Patch(color=c, label=name) for c, name in zip(colours, class_names)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(class_names), 6), fontsize=8,
               frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


class VolumeEvaluation:
    """Scores every prediction in ``pred_dir`` against its label in ``label_dir`` (paired by name, see
    :func:`pair_files`) and writes ``metrics.csv``, ``summary.md``, ``summary.json`` and, with ``image_dir``,
    ``overlays/<volume>.png`` into ``output_dir``.

    Args:
        pred_dir, label_dir: folders of predicted and reference label maps (NIfTI, class ids 0..num_classes-1).
        output_dir: where the results go (created).
        image_dir: optional folder of the images, for the overlays.
        num_classes: number of classes including the background 0.
        class_names: names of the classes 1 .. num_classes - 1.
        overlay_slices: slices per overlay picture (0: no pictures).
    """

    def __init__(
        self, pred_dir: str | os.PathLike | None, label_dir: str | os.PathLike | None,
        output_dir: str | os.PathLike, image_dir: str | os.PathLike | None = None, num_classes: int = 5,
        class_names: Sequence[str] = ("AA", "LAC", "LVC", "MYO"), overlay_slices: int = 3,
    ) -> None:
        if len(class_names) != num_classes - 1:
            raise ValueError(f"class_names {list(class_names)} should name the {num_classes - 1} foreground "
                             f"classes 1 .. {num_classes - 1}")
        self.pred_dir, self.label_dir, self.image_dir = pred_dir, label_dir, image_dir
        self.output_dir = Path(output_dir)
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.overlay_slices = overlay_slices

    def score(self, pair: VolumePair) -> list[dict]:
        """One row per foreground class of one volume: the CSV columns plus ``pred_empty`` / ``label_empty``."""
        label, spacing = load_label_map(pair.label, self.num_classes)
        pred, pred_spacing = load_label_map(pair.pred, self.num_classes)
        if not np.allclose(pred_spacing, spacing, rtol=1e-3):
            logger.warning("%s: voxel size %s differs from the label's %s; the label's is used (voxel space)",
                           pair.pred, pred_spacing, spacing)
        scores = class_metrics(pred, label, self.num_classes, spacing)
        return [{"volume": pair.name, "class": c, **scores[c], "class_name": name,
                 "pred_empty": not (pred == c).any(), "label_empty": not (label == c).any()}
                for c, name in zip(range(1, self.num_classes), self.class_names)]

    def run(self) -> dict:
        """Scores every volume, then writes the outputs; returns the summary (as ``summary.json``)."""
        pairs = pair_files(self.pred_dir, self.label_dir, self.image_dir)
        check_shapes(pairs)
        rows = []
        for i, pair in enumerate(pairs, 1):
            volume_rows = self.score(pair)
            rows += volume_rows
            logger.info("evaluate %d/%d %s: Dice (%%) %s", i, len(pairs), pair.name,
                        "  ".join(f"{r['class_name']} {r['dice']:.2f}" for r in volume_rows))
        summary = {**summarise(rows, self.class_names), "pred_dir": str(self.pred_dir),
                   "label_dir": str(self.label_dir)}
        markdown = format_summary(summary)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows([_csv_value(r[col]) for col in CSV_COLUMNS] for r in rows)
        _write_text(self.output_dir / "metrics.csv", table.getvalue())
        _write_text(self.output_dir / "summary.json", json.dumps(_json_safe(summary), indent=1) + "\n")
        _write_text(self.output_dir / "summary.md", "# Evaluation\n\n" + markdown)
        if self.image_dir is not None and self.overlay_slices > 0:
            self._save_overlays(pairs, rows)
        logger.info("evaluation of %d volumes written to %s", len(pairs), self.output_dir)
        print(markdown, flush=True)
        return summary

    def _save_overlays(self, pairs: Sequence[VolumePair], rows: Sequence[dict]) -> None:
        for pair in pairs:
            if pair.image is None:
                continue
            image = np.asanyarray(nib.load(str(pair.image)).dataobj, dtype=np.float32)
            image = image.reshape(image.shape[:3])
            label, _ = load_label_map(pair.label, self.num_classes)
            pred, _ = load_label_map(pair.pred, self.num_classes)
            dice = "  ".join(f"{r['class_name']} {r['dice']:.1f}" for r in rows if r["volume"] == pair.name)
            save_overlay(image, pred, label, self.output_dir / "overlays" / f"{pair.name}.png", self.class_names,
                         self.overlay_slices, title=f"{pair.name}  (image | prediction | label)  Dice %: {dice}")
