"""Tests for the deterministic cross-modality phantom generator (scripts/phantom.py)."""

from __future__ import annotations

import importlib
import json
import logging
import pathlib
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

# Allow plain `pytest` (not only `python -m pytest`) from any folder to import the bundle's `scripts`.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Imported after the path fix-up without tripping import-order lint rules.
phantom = importlib.import_module("scripts.phantom")
generated = importlib.import_module("scripts.generated")
CLASS_NAMES = phantom.CLASS_NAMES
generate_demo_dataset = phantom.generate_demo_dataset
phantom_labels = phantom.phantom_labels
render_source = phantom.render_source
render_target = phantom.render_target
save_preview = phantom.save_preview

SHAPE = (48, 48, 16)
COUNTS = {"num_source_train": 2, "num_target_train": 2, "num_target_val": 1, "num_target_test": 1}
SPLITS = ("source_train", "target_train", "target_val", "target_test", "target_train_labels")
BLOOD = (1, 2, 3)  # AA, LAC, LVC
MYO = 4


def _load(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine, img.get_data_dtype()


def _class_means(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([image[labels == c].mean() for c in range(len(CLASS_NAMES))])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("phantom") / "data"
    return generate_demo_dataset(out, shape=SHAPE, seed=3, **COUNTS)


def test_labels_deterministic_and_seed_dependent() -> None:
    a = phantom_labels(np.random.default_rng(7), SHAPE)
    b = phantom_labels(np.random.default_rng(7), SHAPE)
    c = phantom_labels(np.random.default_rng(8), SHAPE)
    assert a.dtype == np.uint8 and a.shape == SHAPE
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(render_source(a, np.random.default_rng(1)),
                                  render_source(b, np.random.default_rng(1)))
    np.testing.assert_array_equal(render_target(a, np.random.default_rng(1)),
                                  render_target(b, np.random.default_rng(1)))


@pytest.mark.parametrize("seed", range(12))
def test_all_classes_and_closed_myocardium(seed: int) -> None:
    labels = phantom_labels(np.random.default_rng(seed), SHAPE)
    assert set(np.unique(labels).tolist()) == set(range(len(CLASS_NAMES)))
    lvc, myo = labels == 3, labels == MYO
    # In 3D, every face neighbour of the cavity is myocardium (nothing else touches LVC).
    ring = ndimage.binary_dilation(lvc) & ~lvc
    assert ring.any() and np.all(labels[ring] == MYO)
    # In every slice with cavity, the cavity is a hole of the myocardium, i.e. the ring is closed in-plane.
    slices = np.flatnonzero(lvc.any(axis=(0, 1)))
    assert slices.size >= 3
    for k in slices:
        filled = ndimage.binary_fill_holes(myo[:, :, k])
        assert np.all(filled[lvc[:, :, k]]), f"slice {k}: LVC not enclosed by MYO"
    mid = slices[slices.size // 2]
    assert myo[:, :, mid].sum() > lvc[:, :, mid].sum() * 0.3  # a real ring, not a one-voxel outline


def test_contrast_order_differs_between_modalities() -> None:
    for seed in range(4):
        labels = phantom_labels(np.random.default_rng(seed), SHAPE)
        src = _class_means(render_source(labels, np.random.default_rng(100 + seed)), labels)
        tgt = _class_means(render_target(labels, np.random.default_rng(200 + seed)), labels)
        # Source: every blood pool brighter than myocardium; target: myocardium brighter than every pool.
        assert src[list(BLOOD)].min() > src[MYO]
        assert tgt[list(BLOOD)].max() < tgt[MYO]
        assert not np.array_equal(np.argsort(src), np.argsort(tgt))
        # Not a monotone map either way: LVC vs background keeps its order, LVC vs MYO flips.
        d_src = np.sign(src[:, None] - src[None, :])
        d_tgt = np.sign(tgt[:, None] - tgt[None, :])
        off = ~np.eye(len(CLASS_NAMES), dtype=bool)
        assert np.any((d_src == d_tgt)[off]) and np.any((d_src == -d_tgt)[off])
        # Different intensity scales: MR-like is non-negative, CT-like reaches lung-like negative HU.
        assert src.min() >= 0 and tgt[0] < -200


def test_datalist_structure(dataset: pathlib.Path) -> None:
    root = dataset.parent
    assert dataset.name == "datalist.json"
    datalist = json.loads(dataset.read_text(encoding="utf-8"))
    assert set(datalist) == set(SPLITS) | {"metadata"}
    meta = datalist["metadata"]
    assert meta["generator"] == "scripts.phantom" and meta["seed"] == 3
    assert meta["shape"] == list(SHAPE) and meta["classes"] == list(CLASS_NAMES)
    assert meta["counts"] == {"source_train": 2, "target_train": 2, "target_val": 1, "target_test": 1}
    for split, count in meta["counts"].items():
        assert len(datalist[split]) == count
    assert all(set(e) == {"image"} for e in datalist["target_train"])
    listed_labels = [e["image"] for e in datalist["target_train_labels"]]
    assert listed_labels == [e["image"] for e in datalist["target_train"]]
    for split in ("source_train", "target_val", "target_test", "target_train_labels"):
        assert all(set(e) == {"image", "label"} for e in datalist[split])
    assert datalist["source_train"][0]["image"] == "source_train/src_000_image.nii.gz"
    assert datalist["target_train"][0]["image"] == "target_train/tgt_000_image.nii.gz"

    files = [v for s in SPLITS for e in datalist[s] for v in e.values()]
    for rel in files:
        assert not pathlib.PurePosixPath(rel).is_absolute()
        assert (root / rel).is_file(), rel
    image, affine, dtype = _load(root / datalist["source_train"][0]["image"])
    labels, _, ldtype = _load(root / datalist["source_train"][0]["label"])
    assert image.shape == labels.shape == SHAPE
    assert dtype == np.float32 and ldtype == np.uint8
    np.testing.assert_allclose(affine, np.diag([1.5, 1.5, 1.5, 1.0]))
    assert not any(p.name.startswith(".") for p in root.parent.iterdir()), "temporary folder left behind"


def test_source_and_target_are_unpaired(dataset: pathlib.Path) -> None:
    root = dataset.parent
    datalist = json.loads(dataset.read_text(encoding="utf-8"))
    src = [_load(root / e["label"])[0] for e in datalist["source_train"]]
    tgt = [_load(root / e["label"])[0] for s in ("target_train_labels", "target_val", "target_test")
           for e in datalist[s]]
    assert all(not np.array_equal(a, b) for a in src for b in tgt)


def test_generation_deterministic_across_runs(dataset: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = generate_demo_dataset(tmp_path / "again", shape=SHAPE, seed=3, **COUNTS)
    assert json.loads(other.read_text(encoding="utf-8")) == json.loads(dataset.read_text(encoding="utf-8"))
    datalist = json.loads(dataset.read_text(encoding="utf-8"))
    for rel in [v for s in SPLITS for e in datalist[s] for v in e.values()]:
        np.testing.assert_array_equal(_load(dataset.parent / rel)[0], _load(other.parent / rel)[0])


def test_reuse_without_rewrite(dataset: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    image = dataset.parent / "source_train" / "src_000_image.nii.gz"
    before = (dataset.stat().st_mtime_ns, image.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="scripts.phantom"):
        again = generate_demo_dataset(dataset.parent, shape=SHAPE, seed=3, **COUNTS)
    assert again == dataset
    assert (dataset.stat().st_mtime_ns, image.stat().st_mtime_ns) == before
    assert any("reusing" in r.getMessage() for r in caplog.records)


def test_regenerates_on_changed_arguments_or_missing_file(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "data"
    small = {"num_source_train": 1, "num_target_train": 1, "num_target_val": 0, "num_target_test": 0}
    first = generate_demo_dataset(out, shape=SHAPE, seed=0, **small)
    labels0 = _load(out / "source_train" / "src_000_label.nii.gz")[0]
    generate_demo_dataset(out, shape=SHAPE, seed=1, **small)
    labels1 = _load(out / "source_train" / "src_000_label.nii.gz")[0]
    assert json.loads(first.read_text(encoding="utf-8"))["metadata"]["seed"] == 1
    assert not np.array_equal(labels0, labels1), "a different seed must give different geometry"
    (out / "target_train" / "tgt_000_image.nii.gz").unlink()
    generate_demo_dataset(out, shape=SHAPE, seed=1, **small)
    assert (out / "target_train" / "tgt_000_image.nii.gz").is_file()
    np.testing.assert_array_equal(_load(out / "source_train" / "src_000_label.nii.gz")[0], labels1)
    inode = first.stat().st_ino
    generate_demo_dataset(out, shape=SHAPE, seed=1, overwrite=True, **small)
    assert first.stat().st_ino != inode, "overwrite=True must regenerate even a matching dataset"


def test_interrupted_run_leaves_no_dataset(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_save = generated.save_nifti

    def flaky_save(array: np.ndarray, path: pathlib.Path, spacing_mm) -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated interruption")
        real_save(array, path, spacing_mm)

    monkeypatch.setattr(generated, "save_nifti", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(tmp_path / "data", shape=SHAPE, **COUNTS)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_folder(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        generate_demo_dataset(out, shape=SHAPE, num_source_train=1, num_target_train=1,
                              num_target_val=0, num_target_test=0)
    assert (out / "precious.txt").read_text(encoding="utf-8") == "not ours"


def test_preview_png(dataset: pathlib.Path, tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    png = save_preview(dataset, tmp_path / "sub" / "preview.png", num_slices=2)
    assert png == tmp_path / "sub" / "preview.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
