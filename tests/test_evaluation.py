"""configs/evaluate.yaml end to end on small hand-built NIfTI pairs: the CSV, summary.md / summary.json with the
empty-mask counts, overlays, the pairing rule, and clear errors that leave an earlier evaluation intact."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import run

from scripts.evaluation import CSV_COLUMNS, format_summary, summarise, volume_key
from scripts.metrics import METRIC_NAMES

SHAPE = (16, 16, 8)
SPACING = (1.5, 1.5, 2.0)
CLASS_NAMES = ["AA", "LAC", "LVC", "MYO"]


@pytest.fixture(scope="module")
def config_file(bundle_root) -> str:
    return str(bundle_root / "configs" / "evaluate.yaml")


def save(array: np.ndarray, path: Path, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def reference_labels() -> np.ndarray:
    """Class 1 a 4x4x4 cube at x 2..5; classes 2-4 boxes elsewhere."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    labels[10:14, 2:6, 2:6] = 2
    labels[2:6, 10:14, 2:6] = 3
    labels[10:14, 10:14, 2:6] = 4
    return labels


@pytest.fixture
def dataset(tmp_path) -> dict[str, Path]:
    """case_a: perfect; case_b: class 1 shifted by 2 voxels along x; case_c: class 2 (LAC) not predicted;
    case_d: a label with no prediction. Images sit next to the labels as X_image.nii.gz."""
    labels = reference_labels()
    shifted = labels.copy()
    shifted[shifted == 1] = 0
    shifted[4:8, 2:6, 2:6] = 1
    missing = labels.copy()
    missing[missing == 2] = 0
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    save(labels, pred_dir / "case_a.nii.gz")
    save(shifted, pred_dir / "case_b_pred.nii.gz")
    save(missing, pred_dir / "case_c" / "case_c_image_seg.nii.gz")  # MONAI SaveImage's layout and name
    rng = np.random.default_rng(0)
    for name in ("case_a", "case_b", "case_c", "case_d"):
        save(labels, label_dir / (f"{name}.nii.gz" if name == "case_a" else f"{name}_label.nii.gz"))
        save((100 * labels + rng.normal(0, 10, SHAPE)).astype(np.float32), label_dir / f"{name}_image.nii.gz")
    return {"pred_dir": pred_dir, "label_dir": label_dir, "output_dir": tmp_path / "out"}


def evaluate(config_file: str, **dirs) -> None:
    run(config_file=config_file, logging_file=False, **{k: str(v) for k, v in dirs.items()})


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_evaluate_config_end_to_end(config_file, dataset, caplog, capsys) -> None:
    with caplog.at_level(logging.WARNING, logger="dsan"):
        evaluate(config_file, **dataset, image_dir=dataset["label_dir"])
    out = dataset["output_dir"]
    assert "case_d_label.nii.gz" in caplog.text  # a label without a prediction is a warning, not an error

    columns, rows = read_csv(out / "metrics.csv")
    assert columns == ["volume", "class", "dice", "asd_voxel", "asd_mm", "hd_mm", "hd95_mm", "class_name"]
    assert tuple(columns) == CSV_COLUMNS
    assert [(r["volume"], r["class"], r["class_name"]) for r in rows] == [
        (v, str(c), CLASS_NAMES[c - 1]) for v in ("case_a", "case_b", "case_c") for c in (1, 2, 3, 4)]
    values = {(r["volume"], int(r["class"])): {k: float(r[k]) for k in CSV_COLUMNS[2:7]} for r in rows}
    assert values["case_a", 1] == {"dice": 100.0, "asd_voxel": 0.0, "asd_mm": 0.0, "hd_mm": 0.0, "hd95_mm": 0.0}
    # class 1 of case_b: two 4x4x4 cubes 2 voxels apart (tests/test_metrics.py): Dice 50 %, ASD 6/7 voxel, and
    # with 1.5 mm in-plane every nearest surface voxel is in-plane: 1.5 * 6/7 mm; HD 2 voxels = 3 mm
    assert values["case_b", 1]["dice"] == pytest.approx(50.0)
    assert values["case_b", 1]["asd_voxel"] == pytest.approx(6 / 7, abs=1e-6)
    assert values["case_b", 1]["asd_mm"] == pytest.approx(1.5 * 6 / 7, abs=1e-6)
    assert values["case_b", 1]["hd_mm"] == pytest.approx(3.0)
    assert values["case_b", 2]["dice"] == 100.0
    assert values["case_c", 2]["dice"] == 0.0
    assert all(values["case_c", 2][k] == math.inf for k in ("asd_voxel", "asd_mm", "hd_mm", "hd95_mm"))

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["num_volumes"] == 3 and summary["volumes"] == ["case_a", "case_b", "case_c"]
    dice_aa = summary["metrics"]["dice"]["AA"]
    assert dice_aa["mean"] == pytest.approx(250 / 3) and dice_aa["std"] == pytest.approx(np.std([100, 50, 100]))
    asd_lac = summary["metrics"]["asd_voxel"]["LAC"]  # case_c's inf is counted as a miss, not averaged
    assert asd_lac == {"mean": 0.0, "std": 0.0, "n": 2, "missed": 1, "nan": 0, "num_volumes": 3}
    assert summary["metrics"]["dice"]["LAC"]["mean"] == pytest.approx(200 / 3)  # Dice 0 is averaged
    asd_average = summary["metrics"]["asd_voxel"]["average"]  # case_c misses LAC, so misses the average too
    assert asd_average["missed"] == 1 and asd_average["num_volumes"] == 3
    assert asd_average["mean"] == pytest.approx(np.mean([0, 6 / 7 / 4]))
    assert summary["metrics"]["dice"]["average"]["mean"] == pytest.approx(np.mean([100, 87.5, 75]))
    assert summary["empty"]["LAC"] == {"empty_prediction": ["case_c"], "empty_label": [], "both_empty": []}

    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "| | AA | LAC | LVC | MYO | Average |" in markdown
    assert "| Dice (%) | 83.33 ± 23.57 | 66.67 ± 47.14 | 100.00 ± 0.00 | 100.00 ± 0.00 |" in markdown
    assert ("| ASD (voxel) | 0.29 ± 0.40 | 0.00 ± 0.00 (1 of 3 volumes missed) | 0.00 ± 0.00 | 0.00 ± 0.00 "
            "| 0.11 ± 0.11 (1 of 3 volumes missed) |") in markdown
    assert "Volumes: 3." in markdown
    assert ("LAC: 1 volume with an empty prediction (ASD/HD inf, excluded from the mean; Dice 0, included): case_c"
            in markdown)
    assert "| Dice (%) |" in capsys.readouterr().out  # the table is printed

    import matplotlib.image

    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["case_a.png", "case_b.png", "case_c.png"]
    picture = matplotlib.image.imread(out / "overlays" / "case_b.png")
    assert picture.ndim == 3 and picture.shape[0] > picture.shape[1] > 300  # 3 rows of image | pred | label


def test_both_empty_and_empty_label_cells(config_file, tmp_path) -> None:
    labels = reference_labels()
    no_myo = labels.copy()
    no_myo[no_myo == 4] = 0
    save(no_myo, tmp_path / "pred" / "v1.nii.gz")  # MYO in neither: NaN everywhere
    save(no_myo, tmp_path / "labels" / "v1.nii.gz")
    save(labels, tmp_path / "pred" / "v2.nii.gz")  # MYO predicted but not in the label: Dice 0, inf
    save(no_myo, tmp_path / "labels" / "v2.nii.gz")
    evaluate(config_file, pred_dir=tmp_path / "pred", label_dir=tmp_path / "labels", output_dir=tmp_path / "out")
    _, rows = read_csv(tmp_path / "out" / "metrics.csv")
    myo = {r["volume"]: r for r in rows if r["class_name"] == "MYO"}
    assert myo["v1"]["dice"] == "nan" and myo["v1"]["hd95_mm"] == "nan"
    assert myo["v2"]["dice"] == "0.0" and myo["v2"]["asd_voxel"] == "inf"
    markdown = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "MYO: 1 volume with the class in neither prediction nor label (Dice and ASD/HD NaN" in markdown
    assert "MYO: 1 volume with an empty label but a non-empty prediction (ASD/HD inf" in markdown
    assert "| 0.00 ± 0.00 (n=1) |" in markdown  # MYO Dice: v2's 0 only, v1's NaN left out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["metrics"]["asd_mm"]["MYO"] == {"mean": None, "std": None, "n": 0, "missed": 1, "nan": 1,
                                                   "num_volumes": 2}
    assert ("| ASD (voxel) | 0.00 ± 0.00 | 0.00 ± 0.00 | 0.00 ± 0.00 | n/a (1 of 2 volumes missed) "
            "| 0.00 ± 0.00 (1 of 2 volumes missed) |") in markdown


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    """The config workflow wraps errors in RuntimeError: the messages of the whole chain."""
    messages, exc = [], excinfo.value
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)


def test_shape_mismatch_names_both_files_and_keeps_earlier_results(config_file, dataset) -> None:
    out = dataset["output_dir"]
    out.mkdir()
    (out / "summary.md").write_text("earlier evaluation\n")
    bad = save(np.zeros((16, 16, 7), dtype=np.uint8), dataset["pred_dir"] / "case_d.nii.gz")
    with pytest.raises(Exception) as excinfo:
        evaluate(config_file, **dataset)
    message = error_message(excinfo)
    assert str(bad) in message and str(dataset["label_dir"] / "case_d_label.nii.gz") in message
    assert "(16, 16, 7)" in message and "(16, 16, 8)" in message
    assert (out / "summary.md").read_text(encoding="utf-8") == "earlier evaluation\n"
    assert not (out / "metrics.csv").exists()


def test_predictions_without_labels_are_one_error(config_file, dataset) -> None:
    save(reference_labels(), dataset["pred_dir"] / "case_x.nii.gz")
    save(reference_labels(), dataset["pred_dir"] / "case_y_seg.nii.gz")
    with pytest.raises(Exception) as excinfo:
        evaluate(config_file, **dataset)
    message = error_message(excinfo)
    assert "2 of 5 predictions have no label" in message
    assert "case_x.nii.gz" in message and "case_y_seg.nii.gz" in message
    assert not dataset["output_dir"].exists()


def test_values_outside_the_classes_are_an_error(config_file, dataset) -> None:
    mmwhs_raw = reference_labels().astype(np.int16)
    mmwhs_raw[mmwhs_raw == 1] = 820
    save(mmwhs_raw, dataset["pred_dir"] / "case_d.nii.gz")
    with pytest.raises(Exception) as excinfo:
        evaluate(config_file, **dataset)
    assert "case_d.nii.gz must hold the class ids 0 .. 4" in error_message(excinfo)


def test_missing_pred_dir_is_a_clear_error(config_file, tmp_path) -> None:
    with pytest.raises(Exception) as excinfo:
        run(config_file=config_file, logging_file=False, label_dir=str(tmp_path), output_dir=str(tmp_path / "o"))
    assert "pred_dir is not set" in error_message(excinfo)


@pytest.mark.parametrize(("name", "role", "key"), [
    ("X.nii.gz", "pred", "X"), ("X_pred.nii.gz", "pred", "X"), ("X_seg.nii", "pred", "X"),
    ("X_image_seg.nii.gz", "pred", "X"), ("X_label.nii.gz", "label", "X"), ("X.nii.gz", "label", "X"),
    ("X_image.nii.gz", "label", None), ("X_image.nii.gz", "image", "X"), ("X_label.nii.gz", "image", None),
    ("X_seg.nii.gz", "label", "X_seg"), ("notes.txt", "pred", None), ("_seg.nii.gz", "pred", "_seg"),
])
def test_pairing_rule(name, role, key) -> None:
    assert volume_key(name, role) == key


def hand_made_row(volume: str, c: int, value: float, pred_empty: bool = False) -> dict:
    """One class of one volume with ``value`` for every metric, as VolumeEvaluation.score returns it."""
    return {"volume": volume, "class": c, "class_name": "AB"[c - 1], **dict.fromkeys(METRIC_NAMES, value),
            "pred_empty": pred_empty, "label_empty": False}


def test_a_missed_structure_shows_in_its_class_and_in_the_average() -> None:
    # v4 misses B entirely: its HD is inf, so v4 is a miss of B and of the average, not a good volume
    rows = [hand_made_row(v, c, value) for v, c, value in
            [("v1", 1, 2.0), ("v1", 2, 4.0), ("v2", 1, 6.0), ("v2", 2, 4.0), ("v3", 1, 4.0), ("v3", 2, 7.0),
             ("v4", 1, 0.5)]]
    rows.append(hand_made_row("v4", 2, math.inf, pred_empty=True))
    summary = summarise(rows, ["A", "B"])
    hd = summary["metrics"]["hd_mm"]
    assert hd["A"] == {"mean": 3.125, "std": pytest.approx(np.std([2, 6, 4, 0.5])), "n": 4, "missed": 0, "nan": 0,
                       "num_volumes": 4}
    assert hd["B"] == {"mean": 5.0, "std": pytest.approx(np.std([4, 4, 7])), "n": 3, "missed": 1, "nan": 0,
                       "num_volumes": 4}
    assert hd["average"] == {"mean": 4.5, "std": pytest.approx(np.std([3, 5, 5.5])), "n": 3, "missed": 1, "nan": 0,
                             "num_volumes": 4}  # v4's 0.5 over the one class it found is not averaged
    markdown = format_summary(summary)
    assert "| HD (mm) | 3.12 ± 2.07 | 5.00 ± 1.41 (1 of 4 volumes missed) | 4.50 ± 1.08 (1 of 4 volumes missed) |" \
        in markdown
    assert "B: 1 volume with an empty prediction (ASD/HD inf, excluded from the mean; Dice 0, included): v4" in markdown


def test_cells_without_misses_are_plain_mean_and_std() -> None:
    rows = [hand_made_row(v, c, value) for v, c, value in [("v1", 1, 2.0), ("v1", 2, 4.0), ("v2", 1, 6.0),
                                                            ("v2", 2, 4.0)]]
    summary = summarise(rows, ["A", "B"])
    assert summary["metrics"]["asd_voxel"]["average"] == {"mean": 4.0, "std": 1.0, "n": 2, "missed": 0, "nan": 0,
                                                          "num_volumes": 2}
    markdown = format_summary(summary)
    assert "| ASD (voxel) | 4.00 ± 2.00 | 4.00 ± 0.00 | 4.00 ± 1.00 |" in markdown
    assert "No empty prediction or label: every cell is over all 2 volumes." in markdown
