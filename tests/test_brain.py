"""The brain benchmark generator (scripts/brain.py), on a small constructed template in the wheel's layout: no
download, so the real template's anatomy is not what is tested here, the generator is."""

from __future__ import annotations

import gzip
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from scripts import brain

SHAPE = (56, 64, 52)  # 1 mm, so 28x32x26 at 2 mm before the crop


def ellipsoid(shape, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    return sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1


@pytest.fixture(scope="module")
def template_wheel(tmp_path_factory) -> str:
    """A zip with the wheel's three template members: a brain of WM inside a GM shell, CSF ventricles in the WM
    and a thin CSF rim outside the GM; T1 intensities WM > GM > CSF, 0 outside the brain."""
    brain_mask = ellipsoid(SHAPE, (19, 23, 17))
    gm_outer = ellipsoid(SHAPE, (17, 21, 15))
    wm = ellipsoid(SHAPE, (12, 16, 10)) & ~ellipsoid(SHAPE, (4, 6, 3))
    gm = gm_outer & ~ellipsoid(SHAPE, (12, 16, 10))
    t1 = np.where(wm, 0.85, np.where(gm, 0.6, np.where(brain_mask, 0.3, 0.0)))
    arrays = {"t1": t1, "gm": gm.astype(float), "wm": wm.astype(float)}
    path = tmp_path_factory.mktemp("wheel") / brain.TEMPLATE_WHEEL
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in brain.TEMPLATE_MEMBERS.items():
            img = nib.Nifti1Image((arrays[name] * 255).astype(np.float32), np.eye(4))
            archive.writestr(member, gzip.compress(img.to_bytes()))
    return str(path)


def load(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def class_means(image: np.ndarray, labels: np.ndarray) -> list[float]:
    return [float(image[labels == k].mean()) for k in range(1, 4)]


def test_the_template_maps_are_tissue_probabilities_cropped_to_the_brain(template_wheel) -> None:
    maps = brain.template_maps(brain.read_template(template_wheel))
    probs = maps["probs"]
    assert probs.shape[0] == 4 and probs.shape[1:] == maps["t1"].shape
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)
    assert probs.min() >= -1e-6
    assert all(a < b for a, b in zip(maps["t1"].shape, (28, 32, 26)))  # cropped...
    border = np.ones(maps["t1"].shape, bool)
    border[2:-2, 2:-2, 2:-2] = False
    assert (probs[0][border] >= 0.5).all() and (probs[0][~border] < 0.5).any()  # ...to the brain, 2 voxels around
    labels = brain.tissue_labels(probs)
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_generated_volumes_hold_each_tissue_with_the_contrasts_of_t1_and_t2(template_wheel, tmp_path) -> None:
    datalist_path = brain.generate_brain_dataset(tmp_path / "brain", template_wheel, num_source_train=2,
                                                 num_target_train=2, num_target_val=1, num_target_test=1)
    datalist = json.loads(datalist_path.read_text(encoding="utf-8"))
    assert {k: len(v) for k, v in datalist.items() if k != "metadata"} == {
        "source_train": 2, "target_train": 2, "target_val": 1, "target_test": 1, "target_train_labels": 2}
    assert all("label" not in e for e in datalist["target_train"])  # no target labels where a user has none
    root = datalist_path.parent
    source, source_labels = (load(root / datalist["source_train"][0][k]) for k in ("image", "label"))
    target, target_labels = (load(root / datalist["target_test"][0][k]) for k in ("image", "label"))
    assert nib.load(str(root / datalist["source_train"][0]["image"])).header.get_zooms() == (2.0, 2.0, 2.0)
    for labels in (source_labels, target_labels):
        assert set(np.unique(labels)) == {0, 1, 2, 3}
    csf, gm, wm = class_means(source, source_labels)
    assert wm > gm > csf  # T1-weighted
    csf, gm, wm = class_means(target, target_labels)
    assert csf > gm > wm  # T2-weighted, from the relaxation times
    # every volume is another subject: the warps differ
    other = load(root / datalist["source_train"][1]["label"])
    assert (other != source_labels).mean() > 0.02


def test_the_dataset_is_a_function_of_its_arguments_and_is_reused(template_wheel, tmp_path) -> None:
    counts = {"num_source_train": 1, "num_target_train": 1, "num_target_val": 0, "num_target_test": 0}
    first = brain.generate_brain_dataset(tmp_path / "a", template_wheel, **counts)
    second = brain.generate_brain_dataset(tmp_path / "b", template_wheel, **counts)
    for entry in ("source_train", "target_train"):
        name = json.loads(first.read_text())[entry][0]["image"]
        np.testing.assert_array_equal(load(first.parent / name), load(second.parent / name))
    inode = first.stat().st_ino
    assert brain.generate_brain_dataset(tmp_path / "a", template_wheel, **counts).stat().st_ino == inode


def test_a_wheel_with_another_checksum_is_refused(tmp_path) -> None:
    (tmp_path / brain.TEMPLATE_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match="is not the expected nilearn==0.14.1 wheel"):
        brain.fetch_template(tmp_path)


def test_the_brain_config_needs_the_cpu_profile(tmp_path) -> None:
    with pytest.raises(SystemExit, match="needs configs/cpu.yaml"):
        brain.prepare_brain(tmp_path / "data", "paper", tmp_path / "cache")
    assert not (tmp_path / "data").exists()


def test_the_demo_brain_profile_trains_and_scores_the_three_tissues(template_wheel, tmp_path) -> None:
    from scripts.study import study
    from tests.conftest import TINY

    datalist = brain.generate_brain_dataset(tmp_path / "brain", template_wheel, num_source_train=2,
                                            num_target_train=2, num_target_val=1, num_target_test=1)
    table = study(setups=["source_only", "full"], profile="demo_brain", max_iterations=2, val_interval=1,
                  output_dir=tmp_path / "study", dataset_dir=str(datalist.parent), prepare_dataset="$lambda: None",
                  **TINY)
    header, _, *rows = table.splitlines()
    assert "| Dice CSF | Dice GM | Dice WM | Dice avg |" in header and len(rows) == 2
    results = json.loads((tmp_path / "study" / "results.json").read_text(encoding="utf-8"))
    assert all(0 <= r["dice"]["average"] <= 100 for r in results)


def test_the_configs_prepare_step_fetches_into_the_template_cache(bundle_root, tmp_path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_root / "configs" / f) for f in ("train.yaml", "cpu.yaml", "demo.yaml",
                                                                   "demo_brain.yaml")])
    parser.update({"bundle_root": str(bundle_root), "dataset_dir": str(tmp_path / "data"),
                   "template_cache": str(tmp_path / "cache")})
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / brain.TEMPLATE_WHEEL).write_bytes(b"a damaged download")
    with pytest.raises(SystemExit, match="is not the expected nilearn==0.14.1 wheel"):
        parser.get_parsed_content("prepare_dataset")()
    assert parser.get_parsed_content("class_names") == ["CSF", "GM", "WM"]
