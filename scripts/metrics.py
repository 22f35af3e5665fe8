"""Per-class segmentation metrics of the paper's evaluation (Sec. IV-B, Tables II and III): Dice, ASD, HD, HD95.

ASD is the definition SIFA's evaluation used (``medpy.metric.binary.assd`` before medpy 0.5): the surface of a
mask is ``mask XOR binary_erosion(mask)`` (connectivity 1), ``d(A->B)`` is the Euclidean distance from each
surface voxel of A to the nearest surface voxel of B, and

    ASD = (mean d(pred->label) + mean d(label->pred)) / 2            (mean of the two directed means)

MONAI's ``compute_average_surface_distance(symmetric=True)`` and medpy >= 0.5 instead average the two distance
lists pooled together, which weights the larger surface more; the two agree only when both surfaces have the
same number of voxels. MONAI's helpers do the work here (``get_mask_edges`` for the surfaces,
``get_surface_distance`` for the distances, exact Euclidean, spacing-aware), only the final average differs.

HD and HD95 follow MONAI's ``compute_hausdorff_distance``: the larger of the two directed maxima (HD) or of the
two directed 95th percentiles, linear interpolation (HD95).

Empty masks never raise: Dice is 0 when exactly one of the two masks is empty and NaN when both are; the surface
distances are inf when exactly one is empty and NaN when both are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics.utils import get_mask_edges, get_surface_distance

__all__ = ["METRIC_NAMES", "average_surface_distance", "class_metrics", "dice", "hausdorff_distance",
           "class_intensity_sums", "intensity_distance", "surface_distances", "surface_metrics"]

# the per-class values that class_metrics returns, in the order of the evaluation CSV's columns
METRIC_NAMES = ("dice", "asd_voxel", "asd_mm", "hd_mm", "hd95_mm")


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice coefficient ``2 |P & L| / (|P| + |L|)`` of two binary masks, in [0, 1].

    0 when exactly one mask is empty, NaN when both are.
    """
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    _check_same_shape(pred, label)
    total = int(pred.sum()) + int(label.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(pred, label).sum()) / total


def surface_distances(
    pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The two directed surface-distance lists ``(d(pred->label), d(label->pred))`` of two binary masks.

    Surfaces are ``mask XOR binary_erosion(mask)`` (scipy's default cross structuring element, voxels outside the
    array count as background); each entry is the Euclidean distance from one surface voxel to the nearest surface
    voxel of the other mask, in units of ``spacing`` (voxels when None). If one mask is empty its list is empty
    and the other list is all inf; if both are empty both lists are empty.
    """
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    _check_same_shape(pred, label)
    # no spacing here: with a spacing MONAI switches to sub-voxel edges, which is not the erosion surface
    edges_pred, edges_label = get_mask_edges(pred, label, crop=True)
    if not edges_pred.any() or not edges_label.any():  # no surface to measure to: inf from every voxel of the other
        return np.full(int(edges_pred.sum()), math.inf), np.full(int(edges_label.sum()), math.inf)
    spacing = None if spacing is None else [float(s) for s in spacing]
    to_label = get_surface_distance(edges_pred, edges_label, spacing=spacing)
    to_pred = get_surface_distance(edges_label, edges_pred, spacing=spacing)
    return np.asarray(to_label, dtype=np.float64).ravel(), np.asarray(to_pred, dtype=np.float64).ravel()


def average_surface_distance(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """SIFA's ASD: ``(mean d(pred->label) + mean d(label->pred)) / 2``; inf if exactly one mask is empty, NaN if
    both are. Units of ``spacing`` (voxels when None)."""
    return surface_metrics(pred, label, spacing)["asd"]


def hausdorff_distance(
    pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None = None, percentile: float | None = None
) -> float:
    """Symmetric Hausdorff distance as MONAI defines it: ``max(max d(pred->label), max d(label->pred))``, or with
    ``percentile`` the larger of the two directed percentiles (linear interpolation, as ``torch.quantile``).
    inf if exactly one mask is empty, NaN if both are."""
    to_label, to_pred = surface_distances(pred, label, spacing)
    return _hausdorff(to_label, to_pred, percentile)


def surface_metrics(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None = None) -> dict[str, float]:
    """``{"asd", "hd", "hd95"}`` of two binary masks from one pair of surface-distance lists (see the module
    docstring for the definitions and the empty-mask values)."""
    to_label, to_pred = surface_distances(pred, label, spacing)
    if to_label.size == 0 and to_pred.size == 0:
        return {"asd": math.nan, "hd": math.nan, "hd95": math.nan}
    if to_label.size == 0 or to_pred.size == 0:
        return {"asd": math.inf, "hd": math.inf, "hd95": math.inf}
    return {
        "asd": float((to_label.mean() + to_pred.mean()) / 2.0),
        "hd": _hausdorff(to_label, to_pred, None),
        "hd95": _hausdorff(to_label, to_pred, 95.0),
    }


def class_metrics(
    pred: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> dict[int, dict[str, float]]:
    """Every foreground class ``1 .. num_classes - 1`` of two label maps of the same shape:
    ``{class: {"dice", "asd_voxel", "asd_mm", "hd_mm", "hd95_mm"}}``, Dice in percent, ``_voxel`` with unit
    spacing, ``_mm`` with ``spacing`` (the label's voxel size)."""
    pred, label = np.asarray(pred), np.asarray(label)
    _check_same_shape(pred, label)
    if len(spacing) != label.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {label.ndim}D label map")
    scores = {}
    for c in range(1, num_classes):
        p, lab = pred == c, label == c
        voxel, mm = surface_metrics(p, lab), surface_metrics(p, lab, spacing)
        scores[c] = {"dice": 100.0 * dice(p, lab), "asd_voxel": voxel["asd"], "asd_mm": mm["asd"],
                     "hd_mm": mm["hd"], "hd95_mm": mm["hd95"]}
    return scores


def _hausdorff(to_label: np.ndarray, to_pred: np.ndarray, percentile: float | None) -> float:
    if to_label.size == 0 and to_pred.size == 0:
        return math.nan
    if to_label.size == 0 or to_pred.size == 0:
        return math.inf
    if percentile is None:
        return float(max(to_label.max(), to_pred.max()))
    q = percentile / 100.0
    return float(max(np.quantile(to_label, q), np.quantile(to_pred, q)))


def _check_same_shape(pred: np.ndarray, label: np.ndarray) -> None:
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")


def intensity_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1-Wasserstein distance between the intensity histograms of two equally sized image batches: the mean
    absolute difference of their sorted values (in the images' units, [-1, 1] here). It says how far apart two
    domains' intensity distributions are, e.g. x_s->t and x_t, whatever the anatomy of the unpaired slices."""
    if a.numel() != b.numel():
        raise ValueError(f"intensity_distance needs batches of equal size, got {a.numel()} and {b.numel()} values")
    return (a.detach().flatten().float().sort().values - b.detach().flatten().float().sort().values).abs().mean()


def class_intensity_sums(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, 2): sum of the intensities of ``images`` under each class of ``labels`` and the pixel count,
    to be accumulated over batches and divided into per-class mean intensities."""
    labels = labels.reshape(-1).long()
    values = images.detach().reshape(-1).float()
    sums = torch.zeros(num_classes, device=values.device).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.stack([sums, counts], dim=1)
