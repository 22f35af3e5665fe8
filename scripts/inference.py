"""Inference helpers: which volumes to segment, and the training preprocessing they go through."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigParser
from monai.transforms import Compose

from scripts import validation

VOLUME_SUFFIXES = (*validation.NIFTI_SUFFIXES, ".mha", ".mhd", ".nrrd")
NOT_IMAGES = ("_label", "_seg", "_prob", "_pred")  # label maps and outputs that share a folder with images


def is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def is_image(path: Path) -> bool:
    """A volume file whose name does not mark it as a label map or a prediction."""
    stem = path.name[: -len(next(s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)))]
    return is_volume(path) and not stem.lower().endswith(NOT_IMAGES)


def list_volumes(dataset_dir: str | os.PathLike, validate: bool = False) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for a single volume file, or every image volume in a folder (sorted; files
    named ``*_label``, ``*_seg``, ``*_prob`` or ``*_pred`` are skipped, so a folder of images and labels works).

    Raises FileNotFoundError with the path when there is nothing to segment. With ``validate`` (what
    configs/inference.yaml asks) that is a scripts.validation.InputError instead, and every volume is read and
    checked first (readable, not empty, finite, 3D single-channel).
    """
    error = validation.InputError if validate else FileNotFoundError
    path = Path(dataset_dir)
    if is_volume(path):
        volumes = [path]
    elif not path.is_dir():
        raise error(f"dataset_dir {str(path)!r} is neither a volume file ({', '.join(VOLUME_SUFFIXES)}) "
                    "nor a folder")
    else:
        volumes = sorted(p for p in path.iterdir() if is_volume(p) and is_image(p))
    if not volumes:
        raise error(f"no volume files ({', '.join(VOLUME_SUFFIXES)}) in {str(path)!r}")
    if validate:
        validation.check_volumes(volumes)
    return [{"image": str(p)} for p in volumes]


def training_preprocessing(bundle_root: str | os.PathLike, slice_axcodes: str,
                           pixel_spacing: Sequence[float] | None) -> Compose:
    """configs/train.yaml's ``preprocessing`` with these ``slice_axcodes`` and ``pixel_spacing``: inference reads
    the training declaration rather than a copy, so the two cannot drift apart (image-only items are fine: its
    label steps allow a missing key)."""
    train = ConfigParser.load_config_file(Path(bundle_root) / "configs" / "train.yaml")
    parser = ConfigParser({"preprocessing": train["preprocessing"], "slice_axcodes": slice_axcodes,
                           "pixel_spacing": pixel_spacing})
    return Compose(parser.get_parsed_content("preprocessing"))
