"""Data preparation (`python -m scripts prepare ...`): MMWHS, SIFA npz and BraTS on small generated trees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from scripts.prepare import (
    MMWHS_LABEL_MAP,
    SIFA_LABEL_MAP,
    PrepareCommand,
    PrepareError,
    prepare_brats,
    prepare_mmwhs,
    prepare_sifa,
    read_volume,
)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 16)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Raw MMWHS structures, each as a box (offset by patient so that every patient differs).
STRUCTURE_BOXES = {
    820: (slice(4, 8), slice(4, 8), slice(4, 8)),
    420: (slice(8, 12), slice(4, 8), slice(4, 8)),
    500: (slice(12, 16), slice(4, 8), slice(4, 8)),
    205: (slice(4, 8), slice(8, 12), slice(8, 12)),
    550: (slice(8, 10), slice(8, 12), slice(8, 12)),
    600: (slice(10, 12), slice(8, 12), slice(8, 12)),
    850: (slice(12, 14), slice(8, 12), slice(8, 12)),
}


def lut(mapping: dict[int, int]) -> np.ndarray:
    table = np.full(max(mapping) + 1, 255, dtype=np.uint8)
    for raw, cls in mapping.items():
        table[raw] = cls
    return table


MMWHS_LUT = lut(MMWHS_LABEL_MAP)


def rotation_x(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def make_affine(kind: int) -> np.ndarray:
    """Three voxel-to-world conventions: already RAS, a signed axis permutation (LPS-like), oblique."""
    aff = np.eye(4)
    if kind == 0:
        aff[:3, :3] = np.diag([1.5, 1.5, 2.0])
        aff[:3, 3] = [-10.0, 5.0, 3.0]
    elif kind == 1:
        aff[:3, :3] = np.array([[0.0, 0.0, -2.0], [-1.2, 0.0, 0.0], [0.0, 1.2, 0.0]])
        aff[:3, 3] = [30.0, 12.0, -7.0]
    else:
        aff[:3, :3] = rotation_x(20.0) @ np.diag([-1.0, 1.1, 1.3])
        aff[:3, 3] = [5.0, 5.0, 5.0]
    return aff


def encoded_image(shape: tuple[int, ...]) -> np.ndarray:
    """Every voxel's value encodes its index, so positions can be checked after reorientation and crop."""
    i, j, k = np.indices(shape)
    return (i + 100 * j + 10000 * k).astype(np.float32)


def heart_label(patient: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.int16)
    shift = patient % 3
    for value, box in STRUCTURE_BOXES.items():
        label[tuple(slice(s.start + shift, s.stop + shift) for s in box)] = value
    return label


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_mmwhs(root: Path, modality: str, ids: list[int], start_kind: int = 0) -> dict[str, dict]:
    """An MMWHS-shaped folder (<modality>_train_<id>_{image,label}.nii.gz); returns what was written."""
    folder = root / f"{modality}_train"
    folder.mkdir(parents=True)
    written = {}
    for n, pid in enumerate(ids):
        affine = make_affine((n + start_kind) % 3)
        image, label = encoded_image(SHAPE), heart_label(pid)
        save_nifti(folder / f"{modality}_train_{pid}_image.nii.gz", image, affine)
        save_nifti(folder / f"{modality}_train_{pid}_label.nii.gz", label, affine)
        written[str(pid)] = {"image": image, "label": label, "affine": affine}
    return written


def assert_world_match(image_path: Path, label_path: Path, src_image: np.ndarray, expected_label: np.ndarray,
                       src_affine: np.ndarray) -> None:
    """Every output voxel holds the source voxel at the same world position (image and mapped label)."""
    out = nib.load(str(image_path))
    out_label = nib.load(str(label_path))
    np.testing.assert_allclose(out.affine, out_label.affine)
    data, labels = np.asarray(out.dataobj), np.asarray(out_label.dataobj)
    assert data.shape == labels.shape and labels.dtype == np.uint8
    idx = np.indices(data.shape).reshape(3, -1)
    src = (np.linalg.inv(src_affine) @ out.affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    rounded = np.round(src).astype(int)
    np.testing.assert_allclose(src, rounded, atol=1e-3)
    np.testing.assert_array_equal(data.reshape(-1), src_image[tuple(rounded)])
    np.testing.assert_array_equal(labels.reshape(-1), expected_label[tuple(rounded)])


def load_datalist(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def patients_by_split(datalist: dict) -> dict[str, list[str]]:
    return datalist["metadata"]["patients"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def mmwhs(tmp_path: Path) -> dict:
    data = {"mr": make_mmwhs(tmp_path / "dl", "mr", [1001, 1002, 1003]),
            "ct": make_mmwhs(tmp_path / "dl", "ct", [1001, 1002, 1003, 1004, 1005, 1006], start_kind=1)}
    return {"root": tmp_path, "source_dir": tmp_path / "dl" / "mr_train", "target_dir": tmp_path / "dl" / "ct_train",
            **data}


# --------------------------------------------------------------------------------------------------- MMWHS


def test_mmwhs_splits_labels_orientation_and_crop(mmwhs: dict) -> None:
    out = mmwhs["root"] / "prepared"
    path = prepare_mmwhs(source_dir=mmwhs["source_dir"], target_dir=mmwhs["target_dir"], output_dir=out,
                         crop_margin=2)
    assert path == out / "datalist.json"
    datalist = load_datalist(path)
    assert [len(datalist[k]) for k in ("source_train", "target_train", "target_val", "target_test")] == [3, 4, 1, 1]
    assert all(set(e) == {"image"} for e in datalist["target_train"])
    assert [e["image"] for e in datalist["target_train_labels"]] == [e["image"] for e in datalist["target_train"]]
    for split in ("source_train", "target_val", "target_test"):
        assert all(set(e) == {"image", "label"} for e in datalist[split])

    patients = patients_by_split(datalist)
    assert patients["source_train"] == ["1001", "1002", "1003"]
    target = patients["target_train"] + patients["target_val"] + patients["target_test"]
    assert sorted(target) == ["1001", "1002", "1003", "1004", "1005", "1006"]  # each target patient exactly once

    meta = datalist["metadata"]
    assert meta["dataset"] == "mmwhs" and meta["source_modality"] == "mr" and meta["target_modality"] == "ct"
    assert meta["class_names"] == ["background", "AA", "LAC", "LVC", "MYO"]
    assert meta["crop"]["enabled"] and meta["crop"]["margin_voxels"] == 2
    assert meta["split"]["seed"] == 0 and meta["split"]["method"] == "random"
    assert meta["counts"]["target_train"] == 4 and meta["orientation"] == "RAS"

    entries = ([("mr", e) for e in datalist["source_train"]]
               + [("ct", e) for k in ("target_train_labels", "target_val", "target_test") for e in datalist[k]])
    for modality, entry in entries:
        assert not Path(entry["image"]).is_absolute()
        pid = entry["image"].split("_")[-2]
        src = mmwhs[modality][pid]
        img = nib.load(str(out / entry["image"]))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        labels = np.asarray(nib.load(str(out / entry["label"])).dataobj)
        # exact remapping: 820 -> 1 AA, 420 -> 2 LAC, 500 -> 3 LVC, 205 -> 4 MYO; the crop keeps the whole heart
        for raw, cls in ((820, 1), (420, 2), (500, 3), (205, 4)):
            assert (labels == cls).sum() == (src["label"] == raw).sum() > 0
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
        assert_world_match(out / entry["image"], out / entry["label"], src["image"], MMWHS_LUT[src["label"]],
                           src["affine"])
        # crop: bounding box of the heart in RAS space plus the 2-voxel margin, clipped to the volume
        canon = nib.as_closest_canonical(nib.Nifti1Image(src["label"], src["affine"]))
        fg = np.argwhere(np.asarray(canon.dataobj) != 0)
        lo, hi = np.maximum(fg.min(0) - 2, 0), np.minimum(fg.max(0) + 3, canon.shape)
        assert img.shape == tuple(hi - lo)


def test_mmwhs_without_target_labels_lists_and_writes_no_target_label(mmwhs: dict) -> None:
    from scripts.data import check_dataset, split_labelled

    out = mmwhs["root"] / "prepared"
    path = prepare_mmwhs(source_dir=mmwhs["source_dir"], target_dir=mmwhs["target_dir"], output_dir=out,
                         no_crop=True, without_target_labels=True)
    datalist = load_datalist(path)
    assert "target_train_labels" not in datalist and datalist["metadata"]["target_labels"] is False
    for split in ("target_train", "target_val", "target_test"):
        assert datalist[split] and all(set(e) == {"image"} for e in datalist[split])
    assert all(set(e) == {"image", "label"} for e in datalist["source_train"])
    assert not list(out.glob("target_*/*_label.nii.gz"))
    check_dataset(out, path, num_classes=5)  # training accepts it
    assert not split_labelled(path, "target_val")


def test_mmwhs_no_crop(mmwhs: dict) -> None:
    out = mmwhs["root"] / "prepared"
    datalist = load_datalist(prepare_mmwhs(source_dir=mmwhs["source_dir"], target_dir=mmwhs["target_dir"],
                                           output_dir=out, no_crop=True))
    assert datalist["metadata"]["crop"] == {"enabled": False}
    assert datalist["metadata"]["orientation"] == "RAS"
    assert "slice_axis" not in datalist["metadata"]
    for entry in datalist["source_train"]:
        src = mmwhs["mr"][entry["image"].split("_")[-2]]
        img = nib.load(str(out / entry["image"]))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert sorted(img.shape) == sorted(SHAPE)
        assert_world_match(out / entry["image"], out / entry["label"], src["image"], MMWHS_LUT[src["label"]],
                           src["affine"])


def test_seeded_split_is_reproducible(mmwhs: dict) -> None:
    kwargs = {"source_dir": mmwhs["source_dir"], "target_dir": mmwhs["target_dir"], "no_crop": True}
    first = load_datalist(prepare_mmwhs(output_dir=mmwhs["root"] / "a", seed=3, **kwargs))
    again = load_datalist(prepare_mmwhs(output_dir=mmwhs["root"] / "b", seed=3, **kwargs))
    assert patients_by_split(first) == patients_by_split(again)
    assert {k: v for k, v in first.items() if k != "metadata"} == {k: v for k, v in again.items() if k != "metadata"}
    tests = set()
    for seed in range(4):
        other = load_datalist(prepare_mmwhs(output_dir=mmwhs["root"] / f"s{seed}", seed=seed, overwrite=True,
                                            **kwargs))
        tests.add(tuple(patients_by_split(other)["target_test"] + patients_by_split(other)["target_val"]))
    assert len(tests) > 1  # the seed matters


def test_sifa_split_option_and_split_file(tmp_path: Path) -> None:
    make_mmwhs(tmp_path, "mr", [1001, 1007, 1009, 1018, 1019])
    make_mmwhs(tmp_path, "ct", [1001, 1002, 1003, 1004, 1008, 1014, 1019])
    kwargs = {"source_dir": tmp_path / "mr_train", "target_dir": tmp_path / "ct_train", "no_crop": True}
    datalist = load_datalist(prepare_mmwhs(output_dir=tmp_path / "sifa", split="sifa", hold_out_source_test=True,
                                           **kwargs))
    patients = patients_by_split(datalist)
    assert patients["target_test"] == ["1003", "1008", "1014", "1019"]
    assert patients["source_test"] == ["1007", "1009", "1018", "1019"]
    assert patients["source_train"] == ["1001"]
    assert len(patients["target_val"]) == 1 and sorted(patients["target_val"] + patients["target_train"]) == [
        "1001", "1002", "1004"]
    assert len(datalist["source_test"]) == 4 and all("label" in e for e in datalist["source_test"])
    assert datalist["metadata"]["split"]["method"] == "sifa"
    for role in ("source", "target"):  # no patient in two splits of one modality
        ids = [p for split, ps in patients.items() if split.startswith(role) for p in ps]
        assert len(ids) == len(set(ids))

    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"ct": {"test": [1002, 1003], "val": ["1004"]}}))
    patients = patients_by_split(load_datalist(prepare_mmwhs(output_dir=tmp_path / "file", split_file=split_file,
                                                             **kwargs)))
    assert patients["target_test"] == ["1002", "1003"] and patients["target_val"] == ["1004"]
    assert patients["source_train"] == ["1001", "1007", "1009", "1018", "1019"]

    split_file.write_text(json.dumps({"ct": {"test": [1002, 1099]}}))
    with pytest.raises(PrepareError, match=r"split\.json.*1099"):
        prepare_mmwhs(output_dir=tmp_path / "bad", split_file=split_file, **kwargs)


# ---------------------------------------------------------------------------------------- bad input errors


def _corrupt(tree: Path) -> str:
    (tree / "ct_train" / "ct_train_1002_image.nii.gz").write_bytes(b"this is not a NIfTI file")
    return "ct_train_1002_image.nii.gz"


def _shape_mismatch(tree: Path) -> str:
    save_nifti(tree / "ct_train" / "ct_train_1002_label.nii.gz", np.zeros((24, 20, 15), np.int16), make_affine(2))
    return "ct_train_1002_label.nii.gz"


def _affine_mismatch(tree: Path) -> str:
    path = tree / "ct_train" / "ct_train_1002_label.nii.gz"
    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[0, 3] += 1.0
    save_nifti(path, np.asarray(img.dataobj), affine)
    return "ct_train_1002_label.nii.gz"


def _bad_label_value(tree: Path) -> str:
    path = tree / "ct_train" / "ct_train_1003_label.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj).copy()
    label[0, 0, 0] = 7
    save_nifti(path, label, img.affine)
    return "ct_train_1003_label.nii.gz"


def _empty_folder(tree: Path) -> str:
    for f in (tree / "ct_train").iterdir():
        f.unlink()
    return "ct_train"


def _duplicate_id(tree: Path) -> str:
    for kind in ("image", "label"):
        src = tree / "ct_train" / f"ct_train_1002_{kind}.nii.gz"
        (tree / "ct_train" / f"ct_test_1002_{kind}.nii.gz").write_bytes(src.read_bytes())
    return "1002"


def _missing_label(tree: Path) -> str:
    (tree / "ct_train" / "ct_train_1002_label.nii.gz").unlink()
    return "ct_train_1002_image.nii.gz"


@pytest.mark.parametrize(("damage", "fault"), [
    (_corrupt, "cannot read"),
    (_shape_mismatch, "does not match the shape"),
    (_affine_mismatch, "affine"),
    (_bad_label_value, "label values 7 are outside the MMWHS label set"),
    (_empty_folder, "empty target folder"),
    (_duplicate_id, "duplicate patient id"),
    (_missing_label, "no label volume"),
])
def test_bad_input_gives_one_clear_error_and_keeps_output(tmp_path: Path, damage, fault: str) -> None:
    make_mmwhs(tmp_path, "mr", [1001, 1002])
    make_mmwhs(tmp_path, "ct", [1001, 1002, 1003, 1004])
    out = tmp_path / "out" / "prepared"
    kwargs = {"source_dir": tmp_path / "mr_train", "target_dir": tmp_path / "ct_train", "output_dir": out}
    prepare_mmwhs(**kwargs)
    before = snapshot(out)
    named = damage(tmp_path)
    with pytest.raises(PrepareError) as info:
        prepare_mmwhs(**kwargs, overwrite=True)
    message = str(info.value)
    assert named in message and fault in message
    assert snapshot(out) == before  # the earlier output is byte-identical
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # no temporary folder left behind


def test_refuses_non_empty_output_without_overwrite(mmwhs: dict) -> None:
    out = mmwhs["root"] / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    kwargs = {"source_dir": mmwhs["source_dir"], "target_dir": mmwhs["target_dir"], "output_dir": out}
    with pytest.raises(PrepareError, match="not empty; pass --overwrite"):
        prepare_mmwhs(**kwargs)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    prepare_mmwhs(**kwargs, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "datalist.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(PrepareError, match="contains, the input folder"):
        prepare_mmwhs(**{**kwargs, "output_dir": mmwhs["source_dir"]}, overwrite=True)
    assert (mmwhs["source_dir"] / "mr_train_1001_image.nii.gz").is_file()


def test_swapped_modality_folders_are_refused(mmwhs: dict) -> None:
    with pytest.raises(PrepareError, match="ct_train_1001_image.nii.gz: its name says CT but it is in the source"):
        prepare_mmwhs(source_dir=mmwhs["target_dir"], target_dir=mmwhs["source_dir"],
                      output_dir=mmwhs["root"] / "out")


# ----------------------------------------------------------------------------------------- readers (ITK)


def oblique_sitk_image(shape_xyz: tuple[int, int, int], pixel: int = sitk.sitkFloat32) -> sitk.Image:
    array = encoded_image(shape_xyz).transpose(2, 1, 0) / (100.0 if pixel == sitk.sitkInt16 else 1.0)
    image = sitk.Cast(sitk.GetImageFromArray(np.ascontiguousarray(array)), pixel)
    image.SetSpacing((0.8, 0.9, 2.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    # a rotation about z by atan(4/3): exact decimals, so DICOM strings round-trip
    image.SetDirection((0.6, -0.8, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0))
    return image


def assert_sitk_geometry(array: np.ndarray, affine: np.ndarray, image: sitk.Image) -> None:
    assert array.shape == image.GetSize()
    for index in [(0, 0, 0), (3, 1, 2), (image.GetSize()[0] - 1, 2, image.GetSize()[2] - 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((affine @ [*index, 1.0])[:3], LPS_TO_RAS @ lps, atol=1e-4)
        assert array[index] == pytest.approx(image.GetPixel(index))


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_read_mha_nrrd_with_oblique_direction(tmp_path: Path, suffix: str) -> None:
    image = oblique_sitk_image((9, 7, 5))
    # and a flipped, permuted direction (determinant -1), as some scanners write
    image.SetDirection((0.0, 0.0, -1.0, -0.6, 0.8, 0.0, 0.8, 0.6, 0.0))
    sitk.WriteImage(image, str(tmp_path / f"vol{suffix}"))
    array, affine = read_volume(tmp_path / f"vol{suffix}")
    assert_sitk_geometry(array, affine, image)


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125.4242"
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "CT", "0020|000d": uid + ".1", "0020|000e": uid + ".2",
                           "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.3.{k + 1}",
                           "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:g}" for v in position),
                           "0020|0037": "\\".join(f"{v:g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_read_dicom_series(tmp_path: Path) -> None:
    image = oblique_sitk_image((12, 10, 6), sitk.sitkInt16)
    write_dicom_series(image, tmp_path / "series")
    array, affine = read_volume(tmp_path / "series")
    assert_sitk_geometry(array, affine, image)
    with pytest.raises(PrepareError, match="no readable DICOM series"):
        read_volume(tmp_path)


def test_mmwhs_tree_with_dicom_mha_and_nrrd_volumes(tmp_path: Path) -> None:
    make_mmwhs(tmp_path, "mr", [1001])
    folder = tmp_path / "ct_train"
    folder.mkdir()
    image = oblique_sitk_image((12, 10, 6), sitk.sitkInt16)
    label_array = np.zeros((12, 10, 6), np.int16)
    label_array[2:6, 2:5, 1:3], label_array[6:9, 5:8, 3:5] = 820, 205
    label = sitk.GetImageFromArray(np.ascontiguousarray(label_array.transpose(2, 1, 0)))
    label.CopyInformation(image)
    write_dicom_series(image, folder / "ct_train_1001_image")
    sitk.WriteImage(label, str(folder / "ct_train_1001_label.nrrd"))
    sitk.WriteImage(image, str(folder / "ct_train_1002_image.mha"))
    sitk.WriteImage(label, str(folder / "ct_train_1002_label.mha"))
    sitk.WriteImage(image, str(folder / "ct_train_1003_image.nrrd"))
    sitk.WriteImage(label, str(folder / "ct_train_1003_label.nrrd"))
    out = tmp_path / "out"
    datalist = load_datalist(prepare_mmwhs(source_dir=tmp_path / "mr_train", target_dir=folder, output_dir=out,
                                           crop_margin=1))
    src_array, src_affine = sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.eye(4)
    src_affine[:3, :3] = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    src_affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    entries = datalist["target_train_labels"] + datalist["target_val"] + datalist["target_test"]
    assert len(entries) == 3
    for entry in entries:
        assert nib.aff2axcodes(nib.load(str(out / entry["image"])).affine) == ("R", "A", "S")
        assert_world_match(out / entry["image"], out / entry["label"], src_array, MMWHS_LUT[label_array],
                           src_affine)


# -------------------------------------------------------------------------------------------------- SIFA


def make_sifa(folder: Path, modality: str, ids: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for pid in ids:
        image = rng.normal(size=(16, 12, 6)).astype(np.float32)
        label = np.zeros((16, 12, 6), np.uint8)
        for value in range(1, 5):
            label[2 * value:2 * value + 2, 2:6, 1:4] = value
        np.savez(folder / f"image_{modality}_{pid}.npz", image, label)
        written[str(pid)] = (image, label)
    return written


def test_sifa_npz_remap_and_identity_affine(tmp_path: Path) -> None:
    mr = make_sifa(tmp_path / "mr", "mr", [1001, 1002])
    ct = make_sifa(tmp_path / "ct", "ct", [1003, 1008, 1014, 1019, 1020, 1021])
    out = tmp_path / "out"
    datalist = load_datalist(prepare_sifa(source_dir=tmp_path / "mr", target_dir=tmp_path / "ct", output_dir=out,
                                          split="sifa"))
    patients = patients_by_split(datalist)
    assert patients["target_test"] == ["1003", "1008", "1014", "1019"]
    assert patients["source_train"] == ["1001", "1002"] and len(patients["target_val"]) == 1
    assert datalist["metadata"]["dataset"] == "sifa"
    sifa_lut = lut(SIFA_LABEL_MAP)
    assert sifa_lut[1:].tolist() == [4, 2, 3, 1]  # 1 MYO -> 4, 2 LAC -> 2, 3 LVC -> 3, 4 AA -> 1
    for modality, entry in ([("mr", e) for e in datalist["source_train"]]
                            + [("ct", e) for e in datalist["target_test"]]):
        image, label = (mr if modality == "mr" else ct)[entry["image"].split("_")[-2]]
        img = nib.load(str(out / entry["image"]))
        np.testing.assert_array_equal(img.affine, np.eye(4))
        np.testing.assert_array_equal(np.asarray(img.dataobj), image)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / entry["label"])).dataobj), sifa_lut[label])


def test_sifa_bad_npz(tmp_path: Path) -> None:
    make_sifa(tmp_path / "mr", "mr", [1001, 1002])
    make_sifa(tmp_path / "ct", "ct", [1001, 1002, 1003])
    np.savez(tmp_path / "ct" / "image_ct_1002.npz", np.zeros((4, 4, 4), np.float32))
    kwargs = {"source_dir": tmp_path / "mr", "target_dir": tmp_path / "ct", "output_dir": tmp_path / "out"}
    with pytest.raises(PrepareError, match=r"image_ct_1002\.npz: has no arr_1"):
        prepare_sifa(**kwargs)
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, 0] = 5
    np.savez(tmp_path / "ct" / "image_ct_1002.npz", np.zeros((4, 4, 4), np.float32), label)
    with pytest.raises(PrepareError, match=r"image_ct_1002\.npz: label values 5 are outside the SIFA label set"):
        prepare_sifa(**kwargs)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- BraTS


MODALITY_OFFSET = {"t1": 1e6, "t1ce": 2e6, "t2": 3e6, "flair": 4e6}


def make_brats(root: Path, n: int) -> dict[str, np.ndarray]:
    segs = {}
    for c in range(n):
        case = f"Brats18_TEST_{c}_1"
        folder = root / case
        folder.mkdir(parents=True)
        affine = make_affine(1)  # BraTS files are stored LPS-like
        for modality, offset in MODALITY_OFFSET.items():
            save_nifti(folder / f"{case}_{modality}.nii.gz", encoded_image(SHAPE) + offset, affine)
        seg = np.zeros(SHAPE, np.uint8)
        seg[5:9, 5:9, 5:9], seg[9:11, 5:9, 5:9], seg[11:13, 5:9, 5:9] = 1, 2, 4
        save_nifti(folder / f"{case}_seg.nii.gz", seg, affine)
        segs[case] = seg
    return segs


def test_brats_disjoint_source_target_and_whole_tumour(tmp_path: Path) -> None:
    segs = make_brats(tmp_path / "HGG", 6)
    out = tmp_path / "out"
    datalist = load_datalist(prepare_brats(data_dir=tmp_path / "HGG", source="t2", target="flair", output_dir=out,
                                           seed=1))
    patients = patients_by_split(datalist)
    source = set(patients["source_train"])
    target = set(patients["target_train"] + patients["target_val"] + patients["target_test"])
    assert len(source) == 3 and len(target) == 3 and not source & target  # unpaired: disjoint halves
    assert [len(datalist[k]) for k in ("source_train", "target_train", "target_val", "target_test")] == [3, 1, 1, 1]
    assert datalist["metadata"]["class_names"] == ["background", "whole_tumour"]
    whole = np.array([0, 1, 1, 0, 1], np.uint8)
    for split, modality in (("source_train", "t2"), ("target_test", "flair"), ("target_val", "flair")):
        for entry in datalist[split]:
            assert f"_{modality}_image" in entry["image"]
            case = entry["image"].split("/")[1][: -len(f"_{modality}_image.nii.gz")]
            assert nib.aff2axcodes(nib.load(str(out / entry["image"])).affine) == ("R", "A", "S")
            assert_world_match(out / entry["image"], out / entry["label"],
                               encoded_image(SHAPE) + MODALITY_OFFSET[modality], whole[segs[case]], make_affine(1))
    again = load_datalist(prepare_brats(data_dir=tmp_path / "HGG", source="t2", target="flair",
                                        output_dir=tmp_path / "again", seed=1))
    assert patients_by_split(again) == patients


def test_brats_bad_input(tmp_path: Path) -> None:
    make_brats(tmp_path / "HGG", 6)
    case = "Brats18_TEST_2_1"
    seg_path = tmp_path / "HGG" / case / f"{case}_seg.nii.gz"
    seg = nib.load(str(seg_path))
    bad = np.asarray(seg.dataobj).copy()
    bad[0, 0, 0] = 3
    save_nifti(seg_path, bad, seg.affine)
    kwargs = {"data_dir": tmp_path / "HGG", "output_dir": tmp_path / "out", "source": "t2", "target": "t1"}
    with pytest.raises(PrepareError, match=rf"{case}_seg\.nii\.gz: label values 3 are outside the BraTS label set"):
        prepare_brats(**kwargs)
    for modality in MODALITY_OFFSET:
        (tmp_path / "HGG" / case / f"{case}_{modality}.nii.gz").unlink()
    with pytest.raises(PrepareError, match=rf"{case}_t[12]\.nii\.gz: missing file of BraTS case"):
        prepare_brats(**kwargs)
    with pytest.raises(PrepareError, match="both 't2'"):
        prepare_brats(**{**kwargs, "target": "t2"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrepareError, match="empty data folder: no BraTS cases"):
        prepare_brats(**{**kwargs, "data_dir": empty})


# --------------------------------------------------------------------------------------------------- CLI


def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(fire.core.FireExit) as info:
        fire.Fire({"prepare": PrepareCommand()}, command=["prepare", "--help"], name="scripts")
    assert info.value.code == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err  # fire writes help to stderr
    for command in ("mmwhs", "sifa", "brats"):
        assert command in text
    with pytest.raises(fire.core.FireExit):
        fire.Fire({"prepare": PrepareCommand()}, command=["prepare", "mmwhs", "--help"], name="scripts")
    captured = capsys.readouterr()
    text = captured.out + captured.err
    for flag in ("--source_dir", "--target_dir", "--output_dir", "--split_file", "--seed", "--test_fraction",
                 "--val_fraction", "--crop_margin", "--no_crop", "--overwrite"):
        assert flag in text


def test_cli_error_exit_status_and_success(tmp_path: Path) -> None:
    make_mmwhs(tmp_path, "mr", [1001, 1002])
    make_mmwhs(tmp_path, "ct", [1001, 1002, 1003])
    good = make_mmwhs(tmp_path / "bad", "ct", [1001, 1002, 1003])
    assert good
    _bad_label_value(tmp_path / "bad")
    base = [sys.executable, "-m", "scripts", "prepare", "mmwhs", "--source_dir", str(tmp_path / "mr_train")]
    runs = {
        "bad": base + ["--target_dir", str(tmp_path / "bad" / "ct_train"), "--output_dir", str(tmp_path / "o1")],
        "good": base + ["--target_dir", str(tmp_path / "ct_train"), "--output_dir", str(tmp_path / "o2"),
                        "--no-crop", "--seed", "1"],
    }
    procs = {k: subprocess.Popen(cmd, cwd=BUNDLE_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, cmd in runs.items()}
    results = {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}

    code, out, err = results["bad"]
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "ct_train_1003_label.nii.gz" in errors[0] and "label values 7" in errors[0]
    assert not (tmp_path / "o1").exists()

    code, out, err = results["good"]
    assert code == 0, err
    assert str(tmp_path / "o2" / "datalist.json") in out
    datalist = load_datalist(tmp_path / "o2" / "datalist.json")
    assert datalist["metadata"]["crop"] == {"enabled": False} and datalist["metadata"]["split"]["seed"] == 1
    assert "prepare mmwhs: [1/5]" in err  # progress, one line per volume


def test_label_aliases_accept_a_known_slip(mmwhs: dict) -> None:
    path = mmwhs["target_dir"] / "ct_train_1004_label.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj).copy()
    label[0, 0, 0] = 421
    save_nifti(path, label, img.affine)
    kwargs = {"source_dir": mmwhs["source_dir"], "target_dir": mmwhs["target_dir"], "no_crop": True}
    with pytest.raises(PrepareError, match=r"ct_train_1004_label\.nii\.gz: label values 421 .*--label_aliases"):
        prepare_mmwhs(output_dir=mmwhs["root"] / "a", **kwargs)
    out = mmwhs["root"] / "b"
    datalist = load_datalist(prepare_mmwhs(output_dir=out, label_aliases={421: 420}, **kwargs))
    assert datalist["metadata"]["label_map"]["421"] == 2
    entry = next(e for k in ("target_train_labels", "target_val", "target_test") for e in datalist[k]
                 if "ct_1004" in e["image"])
    expected = MMWHS_LUT[np.where(label == 421, 420, label)]
    assert_world_match(out / entry["image"], out / entry["label"], mmwhs["ct"]["1004"]["image"], expected,
                       mmwhs["ct"]["1004"]["affine"])
    with pytest.raises(PrepareError, match="--label_aliases"):
        prepare_mmwhs(output_dir=mmwhs["root"] / "c", label_aliases={421: 999}, **kwargs)
