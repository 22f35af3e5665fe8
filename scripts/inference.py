"""Inference helpers: which volumes to segment."""

from __future__ import annotations

import os
from pathlib import Path

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


def is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def list_volumes(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for a single volume file or every volume file in a folder (sorted).

    Raises FileNotFoundError with the path when there is nothing to segment.
    """
    path = Path(dataset_dir)
    if is_volume(path):
        return [{"image": str(path)}]
    if not path.is_dir():
        raise FileNotFoundError(f"dataset_dir {str(path)!r} is neither a volume file ({', '.join(VOLUME_SUFFIXES)}) "
                                "nor a folder")
    volumes = sorted(p for p in path.iterdir() if is_volume(p))
    if not volumes:
        raise FileNotFoundError(f"no volume files ({', '.join(VOLUME_SUFFIXES)}) in {str(path)!r}")
    return [{"image": str(p)} for p in volumes]
