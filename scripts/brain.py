"""The real-anatomy development benchmark: brain tissue (CSF / GM / WM), T1-weighted source -> T2-weighted target.

Anatomy and labels come from the MNI ICBM152 2009a nonlinear symmetric template (its T1 image and grey / white
matter probability maps), which the nilearn wheel on PyPI ships inside it. The wheel is fetched once with
``pip download`` (pinned version, checked sha256) into a cache folder and read as a zip archive: nilearn is never
installed or imported, and nothing is fetched from a data hub at run time.

Each volume is a different "subject": the template at 2 mm warped by a random smooth deformation and a small
random affine. Labels are the most probable tissue of the warped probability maps (CSF = brain minus GM minus
WM). Source images are the warped T1 template itself (real T1 contrast: WM > GM > CSF) with a bias field and
Rician noise; target images are T2-weighted spin-echo signals simulated from each tissue's proton density and
relaxation times, mixed by the partial volumes of the maps (CSF > GM > WM), with their own bias field and noise.
Source and target subjects are disjoint (unpaired). docs/data.md documents it; the template's licence is in
docs/data_license.txt.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import zipfile

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.generated import check_counts, check_seed, volume_rngs, write_dataset
from scripts.phantom import bias_field, smooth_noise, with_rician_noise

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("background", "CSF", "GM", "WM")
SPACING_MM = 2.0
GENERATOR_VERSION = 1

TEMPLATE_PACKAGE = "nilearn==0.14.1"
TEMPLATE_WHEEL = "nilearn-0.14.1-py3-none-any.whl"
TEMPLATE_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
TEMPLATE_MEMBERS = {name: f"nilearn/datasets/data/mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
                    for name in ("t1", "gm", "wm")}
"""The template's 1 mm T1 image and GM / WM probability maps (0-255) inside the wheel."""

RELAXATION = {"CSF": (1.00, 4200.0, 1800.0), "GM": (0.80, 1350.0, 95.0), "WM": (0.70, 830.0, 72.0)}
"""(proton density, T1 ms, T2 ms) per tissue: typical literature values at 3 T, rounded."""



class TemplateUnavailableError(SystemExit):
    """The template wheel could not be fetched or failed its checksum: one message, exit status 1."""


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_template(cache_dir: str | os.PathLike) -> pathlib.Path:
    """The template wheel in ``cache_dir``, downloaded there by ``pip download`` if absent; its sha256 checked."""
    cache = pathlib.Path(cache_dir)
    wheel = cache / TEMPLATE_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", TEMPLATE_PACKAGE, "--no-deps", "--only-binary=:all:",
                   "--quiet", "-d", str(cache)]
        logger.info("brain: fetching the MNI ICBM152 template inside %s: %s", TEMPLATE_PACKAGE, " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise TemplateUnavailableError(
                f"ERROR: could not download {TEMPLATE_PACKAGE} (it carries the MNI ICBM152 template): "
                f"{done.stderr.strip()[-500:]}\nOn a machine with PyPI, run `pip download {TEMPLATE_PACKAGE} "
                f"--no-deps -d DIR` and copy {TEMPLATE_WHEEL} into {cache}.")
    if _sha256(wheel) != TEMPLATE_SHA256:
        raise TemplateUnavailableError(f"ERROR: {wheel} is not the expected {TEMPLATE_PACKAGE} wheel (sha256 "
                                       f"{_sha256(wheel)}, expected {TEMPLATE_SHA256}); delete it and rerun.")
    return wheel


def read_template(wheel: str | os.PathLike) -> dict[str, np.ndarray]:
    """The template's 1 mm arrays from the wheel, scaled to 0..1: ``t1``, ``gm``, ``wm``."""
    with zipfile.ZipFile(wheel) as archive:
        images = {name: nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(member)))
                  for name, member in TEMPLATE_MEMBERS.items()}
    return {name: np.asarray(img.dataobj, dtype=np.float32) / 255.0 for name, img in images.items()}


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    shape = [s // factor for s in volume.shape]
    cut = volume[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return cut.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def template_maps(template: dict[str, np.ndarray], factor: int = 2, margin: int = 2) -> dict[str, np.ndarray]:
    """The template at ``factor`` times its voxel size, cropped to the brain with ``margin`` voxels: ``t1`` and the
    tissue probabilities ``probs`` (background, CSF, GM, WM) of every voxel, summing to 1."""
    brain = _block_mean((template["t1"] > 0).astype(np.float32), factor)
    gm, wm = (_block_mean(template[k], factor) for k in ("gm", "wm"))
    gm, wm = np.minimum(gm, brain), np.minimum(wm, brain)
    wm = np.minimum(wm, brain - gm)
    probs = np.stack([1.0 - brain, brain - gm - wm, gm, wm])
    inside = np.argwhere(brain > 0.5)
    lo = np.maximum(inside.min(0) - margin, 0)
    hi = np.minimum(inside.max(0) + margin + 1, brain.shape)
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    return {"t1": _block_mean(template["t1"], factor)[window], "probs": probs[(slice(None), *window)]}


def _random_warp(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel coordinates (3, *shape) to sample the template at: a random rotation (up to 6 degrees about each
    axis), scaling (0.92-1.08 per axis) and shift (2 voxels) about the centre, plus a smooth random displacement
    of up to about 3 voxels (6 mm), so each volume is another brain of the same anatomy."""
    angles = rng.uniform(-np.pi / 30, np.pi / 30, 3)
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        turn = np.eye(3)
        turn[a, a] = turn[b, b] = np.cos(angle)
        turn[a, b], turn[b, a] = -np.sin(angle), np.sin(angle)
        rotation = rotation @ turn
    matrix = rotation @ np.diag(rng.uniform(0.92, 1.08, 3))
    centre = (np.array(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    coords = np.tensordot(matrix, grid - centre[:, None, None, None], axes=1) + (centre + rng.uniform(-2, 2, 3))[
        :, None, None, None]
    displacement = np.stack([smooth_noise(rng, shape, 6.0) for _ in range(3)])
    return (coords + 3.0 * displacement / max(float(np.abs(displacement).max()), 1e-6)).astype(np.float32)


def warp_subject(maps: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One subject: the template's ``t1`` and ``probs`` resampled (linearly) at a random warp of its grid."""
    coords = _random_warp(rng, maps["t1"].shape)
    t1 = ndimage.map_coordinates(maps["t1"], coords, order=1, cval=0.0)
    probs = np.stack([ndimage.map_coordinates(p, coords, order=1, cval=float(k == 0))
                      for k, p in enumerate(maps["probs"])])
    return {"t1": t1, "probs": probs / probs.sum(0, keepdims=True)}


def tissue_labels(probs: np.ndarray) -> np.ndarray:
    """The most probable tissue of every voxel: 0 background, 1 CSF, 2 GM, 3 WM."""
    return np.argmax(probs, axis=0).astype(np.uint8)


def render_t1(subject: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The source image: the subject's T1 template intensities with a bias field, a global gain and Rician noise."""
    image = subject["t1"] * bias_field(rng, subject["t1"].shape, rng.uniform(0.1, 0.2))
    image = with_rician_noise(image, rng.uniform(0.015, 0.03), rng)
    return (image * rng.uniform(800.0, 1200.0)).astype(np.float32)


def t2_signal(proton_density: float, t1_ms: float, t2_ms: float, tr_ms: float, te_ms: float) -> float:
    """Spin-echo signal PD (1 - exp(-TR / T1)) exp(-TE / T2)."""
    return proton_density * (1.0 - np.exp(-tr_ms / t1_ms)) * np.exp(-te_ms / t2_ms)


def render_t2(subject: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The target image: a T2-weighted spin echo (TR 4-6 s, TE 90-110 ms) simulated per tissue from
    ``RELAXATION`` (each value jittered by up to 5 %), mixed by the subject's partial volumes, with fine tissue
    texture, a bias field, a global gain and Rician noise."""
    tr, te = rng.uniform(4000.0, 6000.0), rng.uniform(90.0, 110.0)
    signals = [t2_signal(*(v * rng.uniform(0.95, 1.05) for v in RELAXATION[name]), tr, te)
               for name in CLASS_NAMES[1:]]
    image = np.tensordot(np.array([0.0, *signals], dtype=np.float32), subject["probs"], axes=1)
    image *= 1.0 + 0.03 * smooth_noise(rng, image.shape, 1.0)
    image *= bias_field(rng, image.shape, rng.uniform(0.1, 0.2))
    image = with_rician_noise(image, rng.uniform(0.01, 0.02), rng)
    return (image * rng.uniform(800.0, 1200.0)).astype(np.float32)


def generate_brain_dataset(
    output_dir: str | os.PathLike,
    template_wheel: str | os.PathLike,
    num_source_train: int = 8,
    num_target_train: int = 6,
    num_target_val: int = 1,
    num_target_test: int = 3,
    seed: int = 0,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write the brain benchmark (layout and datalist of ``scripts.generated``) and return its datalist path: a
    pure function of the arguments and the template, reused untouched if ``output_dir`` already holds it."""
    seed = check_seed(seed)
    counts = check_counts({"source_train": num_source_train, "target_train": num_target_train,
                           "target_val": num_target_val, "target_test": num_target_test})
    metadata = {"generator": __name__, "version": GENERATOR_VERSION, "seed": seed, "spacing": [SPACING_MM] * 3,
                "classes": list(CLASS_NAMES), "counts": counts,
                "template_sha256": _sha256(pathlib.Path(template_wheel))}
    maps: dict[str, np.ndarray] = {}

    def make_volume(split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not maps:  # read the template only when a volume is to be written
            maps.update(template_maps(read_template(template_wheel)))
        warp_rng, render_rng = volume_rngs(seed, split, index)
        subject = warp_subject(maps, warp_rng)
        render = render_t1 if split.startswith("source") else render_t2
        return render(subject, render_rng), tissue_labels(subject["probs"])

    return write_dataset(output_dir, metadata, make_volume, [SPACING_MM] * 3, overwrite)


def prepare_brain(dataset_dir: str | os.PathLike, size_profile: str, cache_dir: str | os.PathLike) -> pathlib.Path:
    """The brain benchmark in ``dataset_dir`` (the template fetched into ``cache_dir`` first), once the CPU sizes
    are known to be in force (configs/demo_brain.yaml's ``prepare_dataset``)."""
    if size_profile != "cpu":
        raise SystemExit("ERROR: configs/demo_brain.yaml needs configs/cpu.yaml and configs/demo.yaml before it: "
                         "--config_file \"['configs/train.yaml','configs/cpu.yaml','configs/demo.yaml',"
                         "'configs/demo_brain.yaml']\"")
    return generate_brain_dataset(dataset_dir, fetch_template(cache_dir))
