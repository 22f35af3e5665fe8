"""Download-free, deterministic cross-modality cardiac phantom (a stand-in for MMWHS MR -> CT).

Every volume is a heart-like scene: a left-ventricle blood cavity (LVC) enclosed by a myocardium
shell (MYO), a left-atrium blob (LAC) next to the ventricle and an ascending-aorta tube (AA) that runs
along the slice axis (the last array axis), inside a thorax with soft tissue, subcutaneous fat, two
lungs and a vertebra. The same kind of anatomy is rendered in two "modalities" whose contrast order is
inverted between blood pools and myocardium, so a segmenter trained on the source alone fails on the
target while the label distribution is identical -- the domain-shift situation DSAN is designed for.

Source and target volumes always come from different random "patients" (unpaired, as in MMWHS).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.generated import check_counts, check_seed, volume_rngs, write_dataset

__all__ = [
    "CLASS_NAMES",
    "SPACING_MM",
    "generate_demo_dataset",
    "phantom_labels",
    "render_source",
    "render_target",
    "save_preview",
]

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("background", "AA", "LAC", "LVC", "MYO")
AA, LAC, LVC, MYO = 1, 2, 3, 4

SPACING_MM = 1.5
# Bump whenever the generated content changes, so stale cached datasets are regenerated, not reused.
GENERATOR_VERSION = 1
_MIN_SHAPE = (32, 32, 12)
_MAX_TRIES = 20


# Tissue codes of the rendering map: thorax context first, then the heart classes at _HEART + label.
_AIR, _SOFT, _FAT, _LUNG, _BONE = 0, 1, 2, 3, 4
_HEART = 4
_N_TISSUES = _HEART + len(CLASS_NAMES)

# Mean tissue intensities, indexed by tissue code (air, soft, fat, lung, bone, AA, LAC, LVC, MYO).
# Source (bSSFP-like MR, arbitrary units before the global gain): bright blood and fat, dark myocardium.
_SOURCE_MEANS = np.array([0.0, 0.30, 0.78, 0.05, 0.16, 0.82, 0.88, 0.95, 0.20])
# Target (CT-like, HU): myocardium deliberately brighter than the blood pools, the reverse of the source,
# and fat darker than soft tissue, so that intensity alone cannot transfer across modalities.
_TARGET_MEANS = np.array([-1000.0, 55.0, -100.0, -830.0, 750.0, 330.0, 290.0, 310.0, 520.0])


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries (x, y, slices), got {shape!r}")
    out = tuple(int(s) for s in shape)
    if any(s < m for s, m in zip(out, _MIN_SHAPE)):
        raise ValueError(f"shape {out} is too small for the phantom, need at least {_MIN_SHAPE}")
    return out  # type: ignore[return-value]


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Open (broadcastable) grids keep memory at O(n) per axis until a mask is actually formed.
    return tuple(np.arange(n, dtype=np.float64).reshape([-1 if a == i else 1 for a in range(3)])
                 for i, n in enumerate(shape))  # type: ignore[return-value]


def _rotation(theta: float, tilt: float, tilt_dir: float) -> np.ndarray:
    """In-plane rotation by ``theta`` followed by a tilt of the long (slice) axis by ``tilt`` radians."""
    c, s = np.cos(theta), np.sin(theta)
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    k = np.array([np.cos(tilt_dir), np.sin(tilt_dir), 0.0])
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rt = np.eye(3) + np.sin(tilt) * kx + (1.0 - np.cos(tilt)) * (kx @ kx)
    return rt @ rz


def _local(grid: tuple[np.ndarray, ...], center: np.ndarray, rot: np.ndarray) -> list[np.ndarray]:
    """Coordinates of every voxel in the frame of an object centred at ``center`` with axes ``rot``."""
    d = [g - c for g, c in zip(grid, center)]
    return [rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2] for k in range(3)]


def _ellipsoid(grid: tuple[np.ndarray, ...], center: np.ndarray, radii: Sequence[float],
               rot: np.ndarray) -> np.ndarray:
    q = _local(grid, center, rot)
    return (q[0] / radii[0]) ** 2 + (q[1] / radii[1]) ** 2 + (q[2] / radii[2]) ** 2 <= 1.0


def _half_extent(rot: np.ndarray, radii: Sequence[float], axis: int) -> float:
    # Exact half-width of a rotated ellipsoid along a world axis.
    return float(np.sqrt(sum((rot[axis, k] * radii[k]) ** 2 for k in range(3))))


def _radius_towards(a: float, b: float, angle: float) -> float:
    return float(1.0 / np.sqrt((np.cos(angle) / a) ** 2 + (np.sin(angle) / b) ** 2))


def _draw_heart(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    nx, ny, nz = shape
    n = min(nx, ny)
    scale = n / 80.0
    grid = _grid(shape)

    # LV cavity: ellipsoid with its long axis roughly along the slice axis, rotated in plane and tilted.
    thick = max(2.5, rng.uniform(2.6, 4.0) * scale)
    thick_mod = rng.uniform(0.0, 0.2)  # wall-thickness variation around the ring
    max_thick = thick * (1.0 + thick_mod)
    a = rng.uniform(0.1, 0.125) * n
    b = a * rng.uniform(0.8, 1.0)
    c_len = rng.uniform(0.26, 0.34) * nz
    theta = rng.uniform(-0.6, 0.6)
    tilt = rng.uniform(0.0, 0.3)
    rot = _rotation(theta, tilt, rng.uniform(0.0, 2.0 * np.pi))
    center = np.array([
        (nx - 1) / 2.0 + rng.uniform(-0.01, 0.07) * nx,  # and left of the midline (larger x)
        (ny - 1) / 2.0 + rng.uniform(-0.1, -0.04) * ny,  # heart sits anterior (smaller y) in the chest
        (nz - 1) * rng.uniform(0.4, 0.5),
    ])
    # The myocardium must close around the cavity, so the whole shell has to fit inside the volume:
    # shrink the long axis (scalar loop, at most a few dozen steps) until it does.
    room_z = min(center[2], nz - 1 - center[2]) - max_thick - 1.0
    while _half_extent(rot, (a, b, c_len), 2) > room_z and c_len > 2.0:
        c_len *= 0.93
    for ax, size in ((0, nx), (1, ny)):
        room = min(center[ax], size - 1 - center[ax]) - max_thick - 1.0
        ext = _half_extent(rot, (a, b, c_len), ax)
        if ext > room:
            raise RuntimeError("LV does not fit in plane")  # caught by the retry loop
    lv = _ellipsoid(grid, center, (a, b, c_len), rot)

    # Myocardium: a shell of (slightly varying) constant thickness, via the distance to the cavity.
    q = _local(grid, center, rot)
    wall = thick * (1.0 + thick_mod * np.cos(np.arctan2(q[1], q[0]) - rng.uniform(0.0, 2.0 * np.pi)))
    dist = ndimage.distance_transform_edt(~lv)
    myo = (dist > 0) & (dist <= wall)

    # Left atrium: posterior (+y in the LV frame) to the ventricle, towards the base (+z), touching the wall.
    r_la = rng.uniform(0.08, 0.1) * n
    la_radii = (r_la * rng.uniform(0.9, 1.15), r_la * rng.uniform(0.75, 0.95), c_len * rng.uniform(0.5, 0.7))
    alpha = np.pi / 2 + rng.uniform(-0.35, 0.35)
    d_la = _radius_towards(a, b, alpha) + thick + 0.8 * la_radii[1]
    la_local = np.array([d_la * np.cos(alpha), d_la * np.sin(alpha), c_len * rng.uniform(0.35, 0.6)])
    la = _ellipsoid(grid, center + rot @ la_local, la_radii, rot)

    # Ascending aorta: a slightly curved tube from the LV base level up to the top of the volume.
    r_aa = max(2.0, rng.uniform(0.05, 0.065) * n)
    beta = rng.uniform(3.4, 4.0)
    d_aa = _radius_towards(a, b, beta) + thick + r_aa + rng.uniform(0.5, 2.0) * scale
    base = center[:2] + d_aa * np.array([np.cos(beta + theta), np.sin(beta + theta)])
    base = np.clip(base, r_aa + 1.0, np.array([nx, ny]) - r_aa - 2.0)
    z0 = center[2] + c_len * rng.uniform(0.0, 0.3)
    bend_dir = rng.uniform(0.0, 2.0 * np.pi)
    bend = rng.uniform(0.0, 0.08) * n * np.array([np.cos(bend_dir), np.sin(bend_dir)])
    zz = grid[2]
    frac = np.clip((zz - z0) / max(nz - 1 - z0, 1.0), 0.0, 1.0) ** 2
    ax_c = base[0] + bend[0] * frac
    ay_c = base[1] + bend[1] * frac
    tube = ((grid[0] - ax_c) ** 2 + (grid[1] - ay_c) ** 2 <= r_aa**2) & (zz >= z0)
    root = (grid[0] - base[0]) ** 2 + (grid[1] - base[1]) ** 2 + (zz - z0) ** 2 <= r_aa**2
    aa = tube | root

    # Paint in increasing priority: the wall overrides its neighbours, so the ring around LVC stays closed.
    labels = np.zeros(shape, dtype=np.uint8)
    labels[aa] = AA
    labels[la] = LAC
    labels[myo] = MYO
    labels[lv] = LVC
    return labels


def _plausible(labels: np.ndarray) -> bool:
    counts = np.bincount(labels.ravel(), minlength=len(CLASS_NAMES))
    if counts.size != len(CLASS_NAMES) or np.any(counts < 20):
        return False
    lvc = labels == LVC
    if lvc[[0, -1]].any() or lvc[:, [0, -1]].any() or lvc[:, :, [0, -1]].any():
        return False
    # Every neighbour of the cavity must be wall: the ring is closed in-plane and across slices.
    ring = ndimage.binary_dilation(lvc) & ~lvc
    return bool(np.all(labels[ring] == MYO))


def phantom_labels(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Draw one random heart-like label volume.

    Args:
        rng: source of all randomness; the same generator state gives the same volume.
        shape: ``(x, y, slices)``; the slice axis is the last one. At least ``(32, 32, 12)``.

    Returns:
        ``uint8`` array of ``shape`` with values in ``0..4`` (see :data:`CLASS_NAMES`), containing every
        class, with the LV cavity completely enclosed by myocardium.
    """
    shape = _check_shape(shape)
    for _ in range(_MAX_TRIES):
        try:
            labels = _draw_heart(rng, shape)
        except RuntimeError:
            continue
        if _plausible(labels):
            return labels
    raise RuntimeError(f"could not draw a plausible phantom of shape {shape} in {_MAX_TRIES} tries")


def _tissue_map(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thorax context around the labelled heart: air, soft tissue, subcutaneous fat, lungs, vertebra.

    The context is not part of the labels (it is background for segmentation), so it is drawn here, by the
    renderer, around whatever heart it is given.
    """
    nx, ny, nz = labels.shape
    n = min(nx, ny)
    scale = n / 80.0
    x, y, z = _grid(labels.shape)
    x, y = x[..., 0], y[..., 0]
    fg = labels > 0
    dist_fg = ndimage.distance_transform_edt(~fg)

    cx = (nx - 1) / 2.0 + rng.uniform(-0.02, 0.02) * nx
    cy = (ny - 1) / 2.0 + rng.uniform(-0.02, 0.02) * ny
    rx = rng.uniform(0.42, 0.46) * nx
    ry = rng.uniform(0.33, 0.37) * ny
    fat_w = rng.uniform(1.5, 3.0) * scale
    # The vertebra goes behind the most posterior heart voxel, and the chest grows (within the field of
    # view) to hold it, so that a large atrium never cuts into the spine.
    r_sp = rng.uniform(0.05, 0.065) * n
    sx = cx + rng.uniform(-0.02, 0.02) * n
    fg_y = np.flatnonzero(fg.any(axis=(0, 2)))
    heart_back = float(fg_y[-1]) if fg_y.size else cy
    sy = max(cy + ry - r_sp - rng.uniform(2.0, 4.0) * scale, heart_back + r_sp + 3.0)
    ry = min(max(ry, sy + r_sp + fat_w + 1.0 - cy), ny - 1.5 - cy)
    body2d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    depth2d = ndimage.distance_transform_edt(body2d)
    fat2d = body2d & (depth2d <= fat_w)

    # Lungs taper towards both ends of the stack, like the apex and base of a real chest.
    zeta = (z - (nz - 1) / 2.0) / ((nz - 1) / 2.0)
    taper = 1.0 - rng.uniform(0.1, 0.25) * zeta**2
    lungs = np.zeros(labels.shape, dtype=bool)
    for side in (-1.0, 1.0):
        lx = cx + side * rng.uniform(0.22, 0.26) * nx
        ly = cy + rng.uniform(0.0, 0.04) * ny
        la = rng.uniform(0.13, 0.16) * nx * taper
        lb = rng.uniform(0.23, 0.27) * ny * taper
        lungs |= ((x[..., None] - lx) / la) ** 2 + ((y[..., None] - ly) / lb) ** 2 <= 1.0
    chest_wall = fat_w + rng.uniform(2.0, 3.0) * scale
    # A band of mediastinal soft tissue keeps lung out of the thin myocardial wall's partial-volume voxels.
    lungs &= (depth2d > chest_wall)[..., None] & (dist_fg > max(2.5, rng.uniform(2.0, 3.5) * scale))

    spine2d = (x - sx) ** 2 + (y - sy) ** 2 <= r_sp**2
    spine = spine2d[..., None] & (dist_fg > 2.0)
    lungs &= ~ndimage.binary_dilation(spine2d, iterations=2)[..., None]

    tissue = np.full(labels.shape, _AIR, dtype=np.uint8)
    tissue[body2d[..., None] | (dist_fg <= 3.0)] = _SOFT
    tissue[fat2d[..., None] & (dist_fg > 3.0)] = _FAT
    tissue[lungs] = _LUNG
    tissue[spine] = _BONE
    tissue[fg] = _HEART + labels[fg]
    return tissue


def _jittered(means: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Small per-volume changes of every tissue intensity (scanner / contrast-timing variability).
    return means * (1.0 + rng.uniform(-0.05, 0.05, size=means.shape))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / max(float(noise.std()), 1e-12)


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    # Quadratic polynomial in normalised coordinates: smooth, like a receive-coil sensitivity profile.
    x, y, z = (np.linspace(-1.0, 1.0, n).reshape([-1 if a == i else 1 for a in range(3)])
               for i, n in enumerate(shape))
    terms = [x, y, z, x * y, x * z, y * z, x**2, y**2, z**2]
    log_field = sum(rng.normal(0.0, strength) * t for t in terms)
    field = np.exp(log_field - np.mean(log_field))
    return np.broadcast_to(field, shape)


def with_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of ``image`` plus complex Gaussian noise of ``sigma`` per channel, as MR magnitude images are."""
    real = image + sigma * rng.standard_normal(image.shape)
    imag = sigma * rng.standard_normal(image.shape)
    return np.sqrt(real**2 + imag**2)


def render_source(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render a label volume as a source, MR-like image (bSSFP-style contrast, arbitrary units).

    Bright blood pools (LVC, LAC, AA) and fat, dark myocardium and lungs, mid-grey soft tissue; partial
    volume blur, mild tissue texture, a smooth multiplicative bias field and Rician noise (magnitude of a
    complex Gaussian signal), then a random global gain of about 1000.

    Args:
        labels: label volume from :func:`phantom_labels`.
        rng: source of all randomness (thorax context, intensities, bias, noise).

    Returns:
        ``float32`` array of ``labels.shape``, non-negative.
    """
    tissue = _tissue_map(labels, rng)
    img = _jittered(_SOURCE_MEANS, rng)[tissue]
    img = ndimage.gaussian_filter(img, 0.6)
    img *= 1.0 + 0.04 * smooth_noise(rng, img.shape, 2.0)
    img *= bias_field(rng, img.shape, rng.uniform(0.1, 0.2))
    img = with_rician_noise(img, rng.uniform(0.03, 0.05), rng) * rng.uniform(800.0, 1200.0)
    return img.astype(np.float32)


def render_target(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render a label volume as a target, CT-like image (Hounsfield-like units).

    Lungs near -830 HU, fat below soft tissue, blood pools at +290..+340 and the myocardium brighter still
    (about +520), i.e. the blood / myocardium order is inverted with respect to :func:`render_source`.
    Slight blur, a fine correlated grain and additive white Gaussian noise.

    Args:
        labels: label volume from :func:`phantom_labels`.
        rng: source of all randomness (thorax context, intensities, blur, noise).

    Returns:
        ``float32`` array of ``labels.shape``.
    """
    tissue = _tissue_map(labels, rng)
    img = _jittered(_TARGET_MEANS, rng)[tissue]
    img = ndimage.gaussian_filter(img, rng.uniform(0.5, 0.8))
    img += rng.uniform(25.0, 40.0) * smooth_noise(rng, img.shape, 0.8)
    img += rng.uniform(10.0, 18.0) * rng.standard_normal(img.shape)
    return img.astype(np.float32)


def _metadata(seed: int, shape: tuple[int, int, int], counts: dict[str, int]) -> dict:
    return {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "shape": list(shape),
        "spacing": [SPACING_MM] * 3,
        "classes": list(CLASS_NAMES),
        "counts": dict(counts),
    }


def generate_demo_dataset(
    output_dir: str | os.PathLike,
    num_source_train: int = 8,
    num_target_train: int = 8,
    num_target_val: int = 2,
    num_target_test: int = 4,
    shape: tuple[int, int, int] = (80, 80, 40),
    seed: int = 0,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write the unpaired cross-modality phantom dataset and its datalist.

    Layout under ``output_dir``: ``source_train/src_000_{image,label}.nii.gz``,
    ``target_train/tgt_000_{image,label}.nii.gz``, ``target_val/tgt_val_000_...``,
    ``target_test/tgt_test_000_...`` (``float32`` images, ``uint8`` labels, 1.5 mm isotropic affine) and
    ``datalist.json`` with paths relative to ``output_dir``. ``target_train`` entries carry no label;
    the labels of those same volumes are listed separately under ``target_train_labels``, for the
    target-supervised upper bound only.

    The output is a pure function of the arguments. If ``output_dir`` already holds a complete dataset
    generated with the same arguments it is reused untouched (unless ``overwrite``). Otherwise everything
    is written to a temporary sibling folder that is renamed into place only once complete, so an
    interrupted run never leaves a dataset that looks complete.

    Args:
        output_dir: dataset folder; created if missing.
        num_source_train: labelled source (MR-like) training volumes.
        num_target_train: unlabelled target (CT-like) training volumes.
        num_target_val: labelled target validation volumes.
        num_target_test: labelled target test volumes.
        shape: volume shape ``(x, y, slices)``.
        seed: base seed; every volume gets its own independent stream derived from it.
        overwrite: regenerate even if a matching dataset exists, and allow replacing a folder that
            was not produced by this module.

    Returns:
        Path of ``output_dir / 'datalist.json'``.

    Raises:
        FileExistsError: ``output_dir`` holds unrelated content and ``overwrite`` is false.
    """
    shape = _check_shape(shape)
    seed = check_seed(seed)
    counts = check_counts({"source_train": num_source_train, "target_train": num_target_train,
                           "target_val": num_target_val, "target_test": num_target_test})

    def make_volume(split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        geo_rng, render_rng = volume_rngs(seed, split, index)
        labels = phantom_labels(geo_rng, shape)
        render = render_source if split.startswith("source") else render_target
        return render(labels, render_rng), labels

    return write_dataset(output_dir, _metadata(seed, shape, counts), make_volume, [SPACING_MM] * 3, overwrite)


def _first_labelled(datalist: dict, keys: Sequence[str]) -> dict[str, str]:
    for key in keys:
        for entry in datalist.get(key, []):
            if "label" in entry:
                return entry
    raise ValueError(f"datalist has no labelled entry under {list(keys)}")


def save_preview(
    datalist_path: str | os.PathLike, png_path: str | os.PathLike, num_slices: int = 3
) -> pathlib.Path:
    """Save a PNG with mid slices of one source and one target volume, image and label overlay.

    Args:
        datalist_path: a ``datalist.json`` written by :func:`generate_demo_dataset`.
        png_path: output PNG; parent folders are created.
        num_slices: number of slices shown per volume, spread over the middle of the heart.

    Returns:
        ``png_path`` as a :class:`pathlib.Path`.
    """
    # Imported lazily: plotting is optional and must not be needed to generate data; the object-oriented
    # Agg canvas avoids touching pyplot's global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    datalist_path = pathlib.Path(datalist_path)
    png_path = pathlib.Path(png_path)
    root = datalist_path.parent
    datalist = json.loads(datalist_path.read_text(encoding="utf-8"))
    cases = [
        ("source (MR-like)", _first_labelled(datalist, ["source_train"])),
        ("target (CT-like)", _first_labelled(datalist, ["target_train_labels", "target_val", "target_test"])),
    ]
    num_slices = max(1, int(num_slices))
    colours = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8"]
    cmap = ListedColormap(colours)

    fig = Figure(figsize=(2.2 * 2 * num_slices, 2 * 2.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(2, 1)
    for subfig, (title, entry) in zip(subfigs, cases):
        image = np.asarray(nib.load(str(root / entry["image"])).dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(root / entry["label"])).dataobj).astype(np.uint8)
        heart_z = np.flatnonzero((labels > 0).any(axis=(0, 1)))
        lo, hi = (heart_z[0], heart_z[-1]) if heart_z.size else (0, labels.shape[2] - 1)
        slices = np.linspace(lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo), num_slices).round().astype(int)
        # Window on the heart, not on the whole range, so that e.g. CT bone does not wash out the cardiac
        # contrast that the two modalities are meant to disagree on.
        vmin = float(np.percentile(image, 1.0))
        vmax = float(np.percentile(image[labels > 0], 99.5)) if heart_z.size else float(image.max())
        axes = subfig.subplots(1, 2 * num_slices)
        for j, k in enumerate(slices):
            # Transposed so x runs left-right and y (anterior -> posterior) top-down, as in an axial view.
            img2d, lab2d = image[:, :, k].T, labels[:, :, k].T
            for ax, overlay in ((axes[2 * j], False), (axes[2 * j + 1], True)):
                ax.imshow(img2d, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
                if overlay:
                    ax.imshow(np.ma.masked_equal(lab2d, 0), cmap=cmap, vmin=0.5, vmax=4.5, alpha=0.55,
                              interpolation="nearest")
                ax.set_title(f"z={k}" + (" labels" if overlay else ""), fontsize=8)
                ax.set_axis_off()
        subfig.suptitle(title, fontsize=11)
    handles = [Patch(color=c, label=name) for c, name in zip(colours, CLASS_NAMES[1:])]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path
