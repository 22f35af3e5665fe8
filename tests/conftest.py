"""Shared fixtures: small networks and a small generated phantom dataset (no network access)."""

from __future__ import annotations

import locale
import os
import sys
from pathlib import Path

import pytest
import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.phantom import generate_demo_dataset  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# a CPU-sized profile for tests: override ids of configs/train.yaml
TINY = {
    "roi_size": 32,
    "batch_size": 2,
    "encoder_width": 0.125,
    "decoder_channels": 16,
    "discriminator_channels": [8, 8, 8, 8],
    "num_workers": 0,
    "log_interval": 1,
}


@pytest.fixture(autouse=True)
def _keep_locale():
    """SimpleITK's DICOM code (GDCM) switches the process locale to "C"; keep tests independent of order."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom dataset (3 source, 3 target, 2 val, 1 test volumes of 40x40x12); its datalist path."""
    root = tmp_path_factory.mktemp("phantom")
    return generate_demo_dataset(root, num_source_train=3, num_target_train=3, num_target_val=2,
                                 num_target_test=1, shape=(40, 40, 12), seed=1)
