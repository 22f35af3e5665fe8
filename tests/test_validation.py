"""Up-front validation (scripts/validation.py): each input fault stops the run before any engine starts with one
`ERROR:` message naming the file or the config id, and no traceback."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import run

from scripts import validation
from scripts.data import DatasetNotFoundError, check_dataset
from scripts.inference import list_volumes
from scripts.validation import InputError, check_ids, run_call_from_argv, validate_datalist
from tests.conftest import TINY

SHAPE = (12, 10, 4)


def write(path, array) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), str(path))
    return str(path)


def image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def label(shape=SHAPE, value: int = 1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    out[2:6, 2:6, 1:3] = value
    return out


def make_dataset(root, bad: dict | None = None) -> tuple:
    """A valid 3-split dataset under ``root`` (1 source, 1 target, 1 val entry); ``bad`` replaces the array
    written to one relative path. Returns (dataset_dir, datalist)."""
    files = {"src/a_image.nii.gz": image(0), "src/a_label.nii.gz": label(),
             "tgt/b_image.nii.gz": image(1), "val/c_image.nii.gz": image(2), "val/c_label.nii.gz": label(value=4)}
    files.update(bad or {})
    for rel, array in files.items():
        write(root / rel, array)
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({
        "source_train": [{"image": "src/a_image.nii.gz", "label": "src/a_label.nii.gz"}],
        "target_train": [{"image": "tgt/b_image.nii.gz"}],
        "target_val": [{"image": "val/c_image.nii.gz", "label": "val/c_label.nii.gz"}],
    }))
    return root, datalist


def fault(dataset_dir, datalist, num_classes=5) -> str:
    with pytest.raises(InputError) as info:
        check_dataset(dataset_dir, datalist, num_classes)
    message = str(info.value.code)
    assert message.startswith("ERROR: ")
    return message


def test_input_error_is_a_system_exit_with_the_message() -> None:
    error = InputError("label 'x' is wrong")
    assert isinstance(error, SystemExit)
    assert error.code == "ERROR: label 'x' is wrong"


def test_valid_dataset_passes_and_logs_progress(tiny_dataset, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="dsan"):
        count = validate_datalist(tiny_dataset.parent, tiny_dataset, num_classes=5, log_every=4)
    # 3 source images + labels, 3 target images, 2 val and 1 test images + labels
    assert count == 3 * 2 + 3 + 2 * 2 + 1 * 2
    messages = [r.getMessage() for r in caplog.records if r.name == "dsan"]
    assert any("4/15 volumes read" in m for m in messages)
    assert any(m.startswith("input check: the 15 volumes") for m in messages)


# 1. dataset_dir / datalist that do not exist (check_dataset's own guard, kept)
def test_missing_dataset_dir_or_datalist(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="dataset_dir .*nowhere.* does not exist"):
        check_dataset(tmp_path / "nowhere", tmp_path / "nowhere" / "datalist.json", 5)
    with pytest.raises(DatasetNotFoundError, match="datalist .*missing.json.* does not exist"):
        check_dataset(tmp_path, tmp_path / "missing.json", 5)


def test_invalid_json_datalist(tmp_path) -> None:
    (tmp_path / "datalist.json").write_text("{not json")
    message = fault(tmp_path, tmp_path / "datalist.json")
    assert "datalist.json" in message and "not valid JSON" in message


# 2. files listed but missing: up to 10 listed, and the count
def test_missing_files_are_counted_and_listed(tmp_path) -> None:
    dataset_dir, datalist = make_dataset(tmp_path)
    content = json.loads(datalist.read_text(encoding="utf-8"))
    content["target_train"] += [{"image": f"tgt/gone_{i:02d}.nii.gz"} for i in range(12)]
    datalist.write_text(json.dumps(content))
    message = fault(dataset_dir, datalist)
    assert "12 of the 17 files listed in datalist" in message and "do not exist" in message
    assert str(tmp_path / "tgt" / "gone_00.nii.gz") in message and str(tmp_path / "tgt" / "gone_09.nii.gz") in message
    assert "gone_10" not in message and "... and 2 more" in message


def test_entry_without_label(tmp_path) -> None:
    dataset_dir, datalist = make_dataset(tmp_path)
    content = json.loads(datalist.read_text(encoding="utf-8"))
    del content["source_train"][0]["label"]
    datalist.write_text(json.dumps(content))
    message = fault(dataset_dir, datalist)
    assert "entry 0 of split 'source_train'" in message and "'label'" in message


# 3. label values outside 0..num_classes-1
def test_label_values_outside_the_classes(tmp_path) -> None:
    bad = label(value=2)
    bad[0, 0, 0], bad[1, 0, 0] = 9, 7
    dataset_dir, datalist = make_dataset(tmp_path, {"src/a_label.nii.gz": bad})
    message = fault(dataset_dir, datalist, num_classes=5)
    assert str(tmp_path / "src" / "a_label.nii.gz") in message
    assert "values [7, 9] outside 0..4" in message and "in 2 voxels" in message
    check_dataset(dataset_dir, datalist, num_classes=10)  # the same labels are fine with 10 classes


def test_non_integer_label_values(tmp_path) -> None:
    bad = label().astype(np.float32)
    bad[0, 0, 0] = 1.5
    dataset_dir, datalist = make_dataset(tmp_path, {"val/c_label.nii.gz": bad})
    message = fault(dataset_dir, datalist)
    assert str(tmp_path / "val" / "c_label.nii.gz") in message and "non-integer values [1.5]" in message


# 4. empty, all-NaN, NaN-holding and constant volumes
@pytest.mark.parametrize("array, expected", [
    (np.zeros((0, 10, 4), np.float32), "is empty: its shape (0, 10, 4) has a zero-size axis"),
    (np.full(SHAPE, np.nan, np.float32), "is all NaN"),
    (np.where(np.arange(480).reshape(SHAPE) < 3, np.nan, 1.0).astype(np.float32),
     "has 3 voxels that are NaN or infinite"),
    (np.full(SHAPE, 5, np.int16), "is constant (every voxel is 5)"),
])
def test_empty_nan_and_constant_images(tmp_path, array, expected) -> None:
    dataset_dir, datalist = make_dataset(tmp_path, {"tgt/b_image.nii.gz": array})
    message = fault(dataset_dir, datalist)
    assert f"image {str(tmp_path / 'tgt' / 'b_image.nii.gz')!r}" in message
    assert expected in message


# 5. 4D / multi-channel volumes (a trailing singleton axis is fine)
def test_multichannel_volume(tmp_path) -> None:
    dataset_dir, datalist = make_dataset(tmp_path, {"src/a_image.nii.gz": image(shape=(*SHAPE, 2))})
    message = fault(dataset_dir, datalist)
    assert str(tmp_path / "src" / "a_image.nii.gz") in message
    assert "has shape (12, 10, 4, 2): a 4D or multi-channel volume" in message


def test_trailing_singleton_axis_is_fine(tmp_path) -> None:
    dataset_dir, datalist = make_dataset(tmp_path, {"src/a_image.nii.gz": image(shape=(*SHAPE, 1))})
    check_dataset(dataset_dir, datalist, 5)


# 6. corrupt or truncated files
@pytest.mark.parametrize("name", ["b_image.nii.gz", "b_image.nii"])
def test_truncated_file(tmp_path, name) -> None:
    dataset_dir, datalist = make_dataset(tmp_path)
    path = tmp_path / "tgt" / name
    write(path, image(shape=(40, 40, 20)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives, half the voxels do not
    datalist.write_text(datalist.read_text(encoding="utf-8").replace("b_image.nii.gz", name))
    message = fault(dataset_dir, datalist)
    assert f"image {str(path)!r} cannot be read: the file is corrupt or truncated" in message
    assert "Error" in message  # the reader's own reason follows (EOFError / OSError)


def test_corrupt_header(tmp_path) -> None:
    dataset_dir, datalist = make_dataset(tmp_path)
    (tmp_path / "val" / "c_label.nii.gz").write_bytes(b"this is not a NIfTI file" * 20)
    message = fault(dataset_dir, datalist)
    assert f"label {str(tmp_path / 'val' / 'c_label.nii.gz')!r} cannot be read" in message


# 7. image / label shape mismatch within one entry
def test_image_label_shape_mismatch(tmp_path) -> None:
    dataset_dir, datalist = make_dataset(tmp_path, {"val/c_label.nii.gz": label(shape=(12, 10, 5))})
    message = fault(dataset_dir, datalist)
    assert "entry 0 of split 'target_val'" in message
    assert str(tmp_path / "val" / "c_image.nii.gz") in message and str(tmp_path / "val" / "c_label.nii.gz") in message
    assert "(12, 10, 4)" in message and "(12, 10, 5)" in message


def test_several_faults_in_one_message(tmp_path) -> None:
    bad = label()
    bad[0, 0, 0] = 9
    dataset_dir, datalist = make_dataset(tmp_path, {"src/a_label.nii.gz": bad,
                                                    "tgt/b_image.nii.gz": np.full(SHAPE, np.nan, np.float32)})
    message = fault(dataset_dir, datalist)
    assert message.startswith("ERROR: 2 problems in datalist")
    assert "a_label.nii.gz" in message and "b_image.nii.gz" in message


# 8. a mistyped override id
def test_check_ids_names_the_unknown_ids_and_the_closest_known() -> None:
    known = {"max_iterations", "lambda_adv", "lambda_secadv", "train", "seed"}
    check_ids(["max_iterations", "train#trainer#amp", "seed"], known)  # nested ids: first component checked
    with pytest.raises(InputError) as info:
        check_ids(["max_iteration", "seed", "trian#trainer#amp"], known, ["configs/train.yaml"])
    message = str(info.value.code)
    assert message.startswith("ERROR: unknown config ids 'max_iteration' (did you mean 'max_iterations'?)")
    assert "'trian#trainer#amp' (did you mean 'train'?)" in message and "(configs/train.yaml)" in message


def test_override_typo_stops_the_python_api_run_before_training(bundle_root, tmp_path) -> None:
    configs = [str(bundle_root / "configs" / "train.yaml"), str(bundle_root / "configs" / "demo.yaml")]
    with pytest.raises(InputError, match=r"'lamda_adv' \(did you mean 'lambda_adv'"):
        run("training", config_file=configs, logging_file=False, output_dir=str(tmp_path / "out"),
            prepare_dataset="$lambda: None", lamda_adv=0.1)
    assert not (tmp_path / "out").exists()


def test_tracking_settings_and_args_file_ids(bundle_root, tmp_path) -> None:
    configs = [str(bundle_root / "configs" / "train.yaml")]
    known = validation.config_ids(configs) | validation.tracking_ids(str(bundle_root / "configs/tracking/mlflow.yaml"))
    assert {"max_iterations", "tracking_uri", "experiment_name", "train"} <= known
    args = tmp_path / "args.yaml"
    args.write_text(f"config_file: {configs[0]}\nmax_iteratons: 3\n")
    call = validation._with_args_file(None, None, {"seed": 1}, str(args))
    assert call.config_file == configs[0] and sorted(call.overrides) == ["max_iteratons", "seed"]
    assert call.values == {"max_iteratons": 3, "seed": 1}  # the explicit arguments win over the args_file


def test_overrides_read_from_a_monai_bundle_command_line() -> None:
    argv = ["/x/site-packages/monai/bundle/__main__.py", "run", "training",
            "--config_file", "['configs/train.yaml','configs/demo.yaml']", "--max_iteration", "5",
            "--amp=true", "--channels-last", "--train#trainer#amp", "true", "--logging_file", "False"]
    call = run_call_from_argv(argv)
    assert call.config_file == ["configs/train.yaml", "configs/demo.yaml"]
    assert call.overrides == ["max_iteration", "amp", "channels_last", "train#trainer#amp"]
    assert run_call_from_argv(["pytest", "-q"]) is None


# inference inputs
def test_inference_inputs_are_checked(tmp_path) -> None:
    write(tmp_path / "in" / "ok.nii.gz", image())
    write(tmp_path / "in" / "nan.nii.gz", np.full(SHAPE, np.nan, np.float32))
    write(tmp_path / "in" / "multi.nii.gz", image(shape=(*SHAPE, 3)))
    with pytest.raises(InputError) as info:
        list_volumes(tmp_path / "in", validate=True)
    message = str(info.value.code)
    assert f"image {str(tmp_path / 'in' / 'nan.nii.gz')!r} is all NaN" in message
    assert f"image {str(tmp_path / 'in' / 'multi.nii.gz')!r} has shape (12, 10, 4, 3)" in message
    assert "ok.nii.gz" not in message
    assert list_volumes(tmp_path / "in" / "ok.nii.gz", validate=True) == [{"image": str(tmp_path / "in" / "ok.nii.gz")}]
    with pytest.raises(InputError, match="neither a volume file"):
        list_volumes(tmp_path / "missing", validate=True)


# end to end: `python -m monai.bundle run` prints one ERROR line and no traceback
def bundle_run(bundle_root, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", "training",
               "--config_file", "['configs/train.yaml','configs/demo.yaml']", "--prepare_dataset", "$lambda: None",
               *args]
    return subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=180)


def test_cli_label_value_out_of_range(bundle_root, tmp_path) -> None:
    bad = label()
    bad[3, 3, 3] = 9
    dataset_dir, _ = make_dataset(tmp_path / "data", {"src/a_label.nii.gz": bad})
    result = bundle_run(bundle_root, "--dataset_dir", str(dataset_dir), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(error) == 1
    assert str(dataset_dir / "src" / "a_label.nii.gz") in error[0] and "[9] outside 0..4" in error[0]
    assert not (tmp_path / "out").exists()


def test_cli_override_typo(bundle_root, tmp_path) -> None:
    result = bundle_run(bundle_root, "--max_iteration", "5", "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "ERROR: unknown config id 'max_iteration' (did you mean 'max_iterations'?)" in result.stderr


def test_checking_stops_after_ten_faults_and_other_formats_go_through_monai(tmp_path) -> None:
    for i in range(12):
        write(tmp_path / "in" / f"v{i:02d}.nii.gz", np.full(SHAPE, np.nan, np.float32))
    with pytest.raises(InputError) as info:
        list_volumes(tmp_path / "in", validate=True)
    message = str(info.value.code)
    assert message.startswith("ERROR: 10+ problems in the input volumes:")
    assert "v09.nii.gz" in message and "v10.nii.gz" not in message and "checking stopped after 10" in message
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scan.mha").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"image '.*scan.mha' cannot be read: MONAI's LoadImage"):
        list_volumes(tmp_path / "other", validate=True)


def readme_flags(bundle_root, ids: str) -> list[str]:
    """The README's own spelling of the ``ids`` flags (e.g. ``--amp True --channels_last True``), as tokens."""
    readme = (bundle_root / "README.md").read_text(encoding="utf-8")
    pattern = r"\s+".join(rf"--{name} \S+" for name in ids.split())
    return re.search(f"`({pattern})`", readme).group(1).split()


def test_readme_boolean_flags_train(bundle_root, tiny_dataset, tmp_path) -> None:
    tiny = [item for k, v in TINY.items() for item in (f"--{k}", str(v).replace(" ", ""))]
    result = bundle_run(bundle_root, *readme_flags(bundle_root, "amp channels_last"),
                        "--dataset_dir", str(tiny_dataset.parent), "--output_dir", str(tmp_path / "out"),
                        "--device", "$torch.device('cpu')", "--max_iterations", "2", "--val_interval", "2", *tiny)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "model.pt").is_file()


def test_boolean_flags_typed_as_text_are_one_error_line(bundle_root, tmp_path) -> None:
    result = bundle_run(bundle_root, "--amp", "true", "--channels_last", "false", "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert error == ["ERROR: --amp true, --channels_last false: the monai.bundle command line passes this as text, "
                     "not a boolean; write --amp True --channels_last False (True and False capitalised, as in "
                     "Python)."]
    assert not (tmp_path / "out").exists()
