"""scripts/metrics.py on hand-built 3D masks whose Dice, ASD, HD and HD95 are worked out by hand: SIFA's ASD
(mean of the two directed means) vs MONAI's pooled mean, spacing, and the empty-mask conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from scipy import ndimage

from scripts.metrics import (
    average_surface_distance,
    class_intensity_sums,
    class_metrics,
    dice,
    hausdorff_distance,
    intensity_distance,
    surface_distances,
    surface_metrics,
)

# MONAI's own compute_* functions call get_mask_edges with a deprecated argument
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

SQRT2, SQRT3 = math.sqrt(2.0), math.sqrt(3.0)


def box(shape, *slices) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[slices] = True
    return mask


def one_hot(mask: np.ndarray) -> torch.Tensor:  # (batch 1, channel 1, ...) as MONAI's metrics take it
    return torch.as_tensor(mask[None, None].astype(np.float32))


@pytest.fixture
def shifted_cubes() -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4x4 cubes, the second shifted by 2 voxels along the first axis (overlap 2x4x4)."""
    a = box((12, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))
    b = box((12, 10, 10), slice(4, 8), slice(2, 6), slice(2, 6))
    return a, b


@pytest.fixture
def nested_cubes() -> tuple[np.ndarray, np.ndarray]:
    """A 3x3x3 prediction centred in a 5x5x5 label: surfaces of 26 and 98 voxels."""
    label = box((9, 9, 9), slice(2, 7), slice(2, 7), slice(2, 7))
    pred = box((9, 9, 9), slice(3, 6), slice(3, 6), slice(3, 6))
    return pred, label


@pytest.fixture
def cube_and_outlier() -> tuple[np.ndarray, np.ndarray]:
    """A 2x2x2 label cube; the prediction is that cube plus one voxel 7 voxels away along the first axis."""
    label = box((12, 6, 6), slice(2, 4), slice(2, 4), slice(2, 4))
    pred = label.copy()
    pred[10, 2, 2] = True
    return pred, label


def test_dice_of_overlapping_cubes() -> None:
    a = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))  # 64 voxels
    b = box((10, 10, 10), slice(3, 7), slice(3, 7), slice(3, 7))  # 64 voxels, overlap 3^3 = 27
    assert dice(a, b) == pytest.approx(2 * 27 / 128)
    assert dice(a, a) == 1.0
    assert float(compute_dice(one_hot(a), one_hot(b), include_background=True)) == pytest.approx(2 * 27 / 128)


def test_shifted_cube_distances_by_hand(shifted_cubes) -> None:
    a, b = shifted_cubes
    # the 56 surface voxels of A, by their first coordinate x = 2..5 (B spans x = 4..7):
    #   x = 2 face (16 voxels): 2 to B's x = 4 face or side faces; x = 3 ring (12): 1; x = 4 ring (12): 0 (on B's
    #   side faces); x = 5 face (16): 12 on B's side faces 0, the 4 inner ones 1 -> sum 48, mean 48/56 = 6/7
    to_b, to_a = surface_distances(a, b)
    assert sorted(to_b.tolist()) == [0.0] * 24 + [1.0] * 16 + [2.0] * 16
    assert sorted(to_a.tolist()) == sorted(to_b.tolist())  # the mirror image
    metrics = surface_metrics(a, b)
    assert metrics["asd"] == pytest.approx(6 / 7)
    assert metrics["hd"] == pytest.approx(2.0)
    # 95th percentile of 56 sorted values: position 0.95 * 55 = 52.25, between two 2s
    assert metrics["hd95"] == pytest.approx(2.0)
    assert surface_metrics(a, a) == {"asd": 0.0, "hd": 0.0, "hd95": 0.0}


def test_sifa_asd_is_the_mean_of_directed_means_not_the_pooled_mean(nested_cubes) -> None:
    pred, label = nested_cubes
    to_label, to_pred = surface_distances(pred, label)
    # every one of the 26 prediction surface voxels is 1 step from the label's shell
    assert to_label.size == 26 and np.allclose(to_label, 1.0)
    # a label shell voxel with m coordinates at +-2 (offsets from the centre) is sqrt(m) from the 3x3x3 cube:
    # m = 1: 6 * 9 = 54 voxels, m = 2: 12 * 3 = 36, m = 3: 8
    assert to_pred.size == 98
    assert np.allclose(sorted(to_pred), [1.0] * 54 + [SQRT2] * 36 + [SQRT3] * 8)
    mean_to_pred = (54 + 36 * SQRT2 + 8 * SQRT3) / 98
    sifa = (1.0 + mean_to_pred) / 2  # 1.1060: what we report
    pooled = (26 * 1.0 + 54 + 36 * SQRT2 + 8 * SQRT3) / (26 + 98)  # 1.1675: medpy >= 0.5, MONAI symmetric=True
    assert average_surface_distance(pred, label) == pytest.approx(sifa, rel=1e-6)
    assert average_surface_distance(label, pred) == pytest.approx(sifa, rel=1e-6)  # symmetric in its arguments
    monai_pooled = float(compute_average_surface_distance(one_hot(pred), one_hot(label), include_background=True,
                                                          symmetric=True))
    assert monai_pooled == pytest.approx(pooled, rel=1e-6)
    assert abs(sifa - pooled) > 0.05
    # HD: the label's corners are sqrt(3) from the prediction; 95th percentile of the 98 sorted label->pred
    # distances sits at position 92.15, inside the eight sqrt(3)
    assert hausdorff_distance(pred, label) == pytest.approx(SQRT3, rel=1e-6)
    assert hausdorff_distance(pred, label, percentile=95) == pytest.approx(SQRT3, rel=1e-6)


def test_hd_and_hd95_with_an_outlier(cube_and_outlier) -> None:
    pred, label = cube_and_outlier
    # pred->label: 8 zeros and the outlier's 7; label->pred: 8 zeros. HD = 7. HD95 (MONAI: linear interpolation
    # of each directed list, then the larger): position 0.95 * 8 = 7.6 between 0 and 7 -> 0.6 * 7 = 4.2
    metrics = surface_metrics(pred, label)
    assert metrics["hd"] == pytest.approx(7.0)
    assert metrics["hd95"] == pytest.approx(4.2)
    assert metrics["asd"] == pytest.approx((7 / 9 + 0) / 2)
    assert float(compute_hausdorff_distance(one_hot(pred), one_hot(label), include_background=True)) == 7.0
    monai_hd95 = compute_hausdorff_distance(one_hot(pred), one_hot(label), include_background=True, percentile=95)
    assert float(monai_hd95) == pytest.approx(4.2, rel=1e-6)


def test_spacing_scales_distances_along_its_axis(cube_and_outlier, shifted_cubes) -> None:
    pred, label = cube_and_outlier  # the outlier is 7 voxels away along the first axis only
    assert hausdorff_distance(pred, label, spacing=(2.0, 1.0, 1.0)) == pytest.approx(14.0)
    assert hausdorff_distance(pred, label, spacing=(2.0, 1.0, 1.0), percentile=95) == pytest.approx(8.4)
    assert hausdorff_distance(pred, label, spacing=(1.0, 3.0, 5.0)) == pytest.approx(7.0)
    monai_hd95 = compute_hausdorff_distance(one_hot(pred), one_hot(label), include_background=True, percentile=95,
                                            spacing=(2.0, 1.0, 1.0))
    assert float(monai_hd95) == pytest.approx(8.4, rel=1e-6)

    a, b = shifted_cubes
    assert average_surface_distance(a, b, spacing=(1.5, 1.5, 1.5)) == pytest.approx(1.5 * 6 / 7)
    # with 2 mm along x: the x = 2 face is 4 mm away, the x = 3 ring 2 mm, and the 4 inner voxels of the x = 5
    # face are nearer to B's side faces (1 mm along y or z) than to its x = 4 face (2 mm): (64 + 24 + 4) / 56
    assert average_surface_distance(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(92 / 56)
    assert hausdorff_distance(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(4.0)


def test_matches_the_medpy_before_0_5_reference_on_random_blobs() -> None:
    """SIFA's medpy.metric.binary.assd, written out with scipy, on irregular masks with different surfaces."""
    rng = np.random.default_rng(0)
    spacing = (0.8, 1.3, 2.0)

    def blob(threshold: float) -> np.ndarray:
        return ndimage.gaussian_filter(rng.standard_normal((20, 18, 14)), 2.0) > threshold

    def directed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        surf_a, surf_b = a ^ ndimage.binary_erosion(a), b ^ ndimage.binary_erosion(b)
        return ndimage.distance_transform_edt(~surf_b, sampling=spacing)[surf_a]

    for _ in range(3):
        pred, label = blob(0.05), blob(0.0)
        expected = (directed(pred, label).mean() + directed(label, pred).mean()) / 2
        expected_hd = max(directed(pred, label).max(), directed(label, pred).max())
        assert average_surface_distance(pred, label, spacing) == pytest.approx(expected, rel=1e-5)
        assert hausdorff_distance(pred, label, spacing) == pytest.approx(expected_hd, rel=1e-5)


@pytest.mark.parametrize("empty", ["pred", "label", "both"])
def test_empty_masks_give_inf_or_nan_and_never_raise(empty) -> None:
    cube = box((8, 8, 8), slice(2, 5), slice(2, 5), slice(2, 5))
    nothing = np.zeros_like(cube)
    pred = nothing if empty in ("pred", "both") else cube
    label = nothing if empty in ("label", "both") else cube
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        metrics = surface_metrics(pred, label, spacing=(1.0, 2.0, 3.0))
        value = dice(pred, label)
    if empty == "both":
        assert math.isnan(value)
        assert all(math.isnan(v) for v in metrics.values())
    else:
        assert value == 0.0
        assert metrics == {"asd": math.inf, "hd": math.inf, "hd95": math.inf}


def test_class_metrics_per_class_with_units(shifted_cubes) -> None:
    a, b = shifted_cubes
    pred = a.astype(np.int64)  # class 1 = the cube A, class 2 absent, class 3 predicted only
    label = 1 * b
    pred[0, 0, 0] = 3
    scores = class_metrics(pred, label, num_classes=4, spacing=(1.5, 1.5, 1.5))
    assert set(scores) == {1, 2, 3}
    assert scores[1]["dice"] == pytest.approx(100 * 2 * 32 / 128)  # percent
    assert scores[1]["asd_voxel"] == pytest.approx(6 / 7)
    assert scores[1]["asd_mm"] == pytest.approx(1.5 * 6 / 7)
    assert scores[1]["hd_mm"] == pytest.approx(3.0)
    assert scores[1]["hd95_mm"] == pytest.approx(3.0)
    assert math.isnan(scores[2]["dice"]) and math.isnan(scores[2]["asd_voxel"])
    assert scores[3]["dice"] == 0.0 and scores[3]["asd_mm"] == math.inf and scores[3]["hd95_mm"] == math.inf
    with pytest.raises(ValueError, match="shape"):
        class_metrics(pred, label[:-1], num_classes=4, spacing=(1.0, 1.0, 1.0))


def test_intensity_distance_is_the_w1_distance_of_the_histograms() -> None:
    a = torch.linspace(-1, 1, 101)
    assert float(intensity_distance(a, a[torch.randperm(101)])) == pytest.approx(0.0)  # order does not matter
    assert float(intensity_distance(a, a + 0.25)) == pytest.approx(0.25)  # a shift moves every quantile
    assert float(intensity_distance(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal size"):
        intensity_distance(torch.zeros(3), torch.zeros(4))


def test_class_intensity_sums_give_per_class_means() -> None:
    images = torch.tensor([[0.5, 0.5, -1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([[1, 1, 0], [2, 0, 0]])
    totals = class_intensity_sums(images, labels, num_classes=4)
    assert totals.tolist() == [[-1.0, 3.0], [1.0, 2.0], [1.0, 1.0], [0.0, 0.0]]
