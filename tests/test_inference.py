"""configs/inference.yaml: every slice predicted, outputs on the input's grid whatever its affine and size."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from torch import nn

from scripts.inference import list_volumes
from scripts.networks import Segmenter
from tests.conftest import TINY


class ThresholdSegmenter(nn.Module):
    """A stand-in segmenter whose answer is known: class 1 wherever the normalised image is above 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-10 * x, 10 * x], dim=1)


def oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic, with a flipped axis: nothing lines up with RAS or RSA."""
    a, b = math.radians(30), math.radians(20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.8, -1.1, 2.5])
    affine[:3, 3] = [12.0, -30.0, 5.0]
    return affine


def write_volume(path, shape=(37, 45, 11)) -> np.ndarray:
    """A volume with an asymmetric bright block, so any flip or transpose would show."""
    image = np.zeros(shape, dtype=np.float32)
    image[3:14, 20:41, 2:5] = 1000.0
    image[25:30, 5:9, 7:10] = 1000.0
    nib.save(nib.Nifti1Image(image, oblique_affine()), str(path))
    return image


def infer(bundle_root, dataset_dir, output_dir, ckpt_path, **overrides) -> None:
    run(config_file=str(bundle_root / "configs" / "inference.yaml"), bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir), output_dir=str(output_dir), ckpt_path=str(ckpt_path), logging_file=False,
        device="$torch.device('cpu')", **overrides)


@pytest.mark.parametrize("axcodes", ["RSA", "RAS"])
def test_output_lines_up_voxel_for_voxel_with_an_oblique_input(bundle_root, tmp_path, axcodes) -> None:
    (tmp_path / "in").mkdir()
    image = write_volume(tmp_path / "in" / "case_01.nii.gz")
    ckpt = tmp_path / "threshold.pt"
    torch.save(ThresholdSegmenter().state_dict(), ckpt)
    infer(bundle_root, tmp_path / "in", tmp_path / "out", ckpt, slice_axcodes=axcodes,
          network_def={"_target_": "tests.test_inference.ThresholdSegmenter"})
    out = nib.load(str(tmp_path / "out" / "case_01_seg.nii.gz"))
    np.testing.assert_allclose(out.affine, oblique_affine(), atol=1e-5)
    prediction = np.asarray(out.dataobj)
    assert prediction.shape == image.shape
    np.testing.assert_array_equal(prediction, (image > 0).astype(np.uint8))


def test_real_segmenter_on_sides_not_multiple_of_8_with_probabilities(bundle_root, tmp_path) -> None:
    (tmp_path / "in").mkdir()
    write_volume(tmp_path / "in" / "a.nii.gz", shape=(33, 29, 7))
    write_volume(tmp_path / "in" / "b.nii", shape=(40, 41, 5))
    ckpt = tmp_path / "model.pt"
    torch.save(Segmenter(1, 5, width=0.125).state_dict(), ckpt)
    infer(bundle_root, tmp_path / "in", tmp_path / "out", ckpt, encoder_width=0.125, save_probabilities=True)
    for name, shape in (("a", (33, 29, 7)), ("b", (40, 41, 5))):
        seg = nib.load(str(tmp_path / "out" / f"{name}_seg.nii.gz"))
        assert seg.shape == shape and seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= set(range(5))
        prob = nib.load(str(tmp_path / "out" / f"{name}_prob.nii.gz"))
        probs = np.asarray(prob.dataobj)
        assert probs.shape[:3] == shape and probs.shape[-1] == 5
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)


def test_dataset_dir_may_be_one_file_or_a_folder(tmp_path) -> None:
    (tmp_path / "v1.nii.gz").write_bytes(b"")
    (tmp_path / "v2.mha").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "v1_label.nii.gz").write_bytes(b"")
    (tmp_path / "v0_seg.nii.gz").write_bytes(b"")
    assert [d["image"] for d in list_volumes(tmp_path)] == [str(tmp_path / "v1.nii.gz"), str(tmp_path / "v2.mha")]
    assert list_volumes(tmp_path / "v1.nii.gz") == [{"image": str(tmp_path / "v1.nii.gz")}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no volume files"):
        list_volumes(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a volume file"):
        list_volumes(tmp_path / "missing")


def test_inference_network_and_preprocessing_match_training(bundle_root) -> None:
    infer_cfg = ConfigParser.load_config_file(str(bundle_root / "configs" / "inference.yaml"))
    train_cfg = ConfigParser.load_config_file(str(bundle_root / "configs" / "train.yaml"))
    assert infer_cfg["network_def"] == train_cfg["network_def"]
    infer_parser = ConfigParser(infer_cfg)
    infer_parser.update({"bundle_root": str(bundle_root)})
    for key in ("num_classes", "encoder_width", "output_stride", "slice_axcodes", "pixel_spacing"):  # no model.json
        assert infer_parser.get_parsed_content(key) == train_cfg[key], key
    train_steps = ConfigParser(train_cfg).get_parsed_content("preprocessing")
    infer_steps = infer_parser.get_parsed_content("preprocessing").transforms
    assert [type(t) for t in infer_steps] == [type(t) for t in train_steps]


def test_a_model_of_output_stride_4_is_rebuilt_with_it(bundle_root, tmp_path) -> None:
    # strides and dilations leave every weight's shape as it is: only model.json can tell the two networks apart
    torch.save(Segmenter(1, 5, width=0.125, output_stride=4).state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({"encoder_width": 0.125, "output_stride": 4}), encoding="utf-8")
    parser = ConfigParser(ConfigParser.load_config_file(str(bundle_root / "configs" / "inference.yaml")))
    parser.update({"bundle_root": str(bundle_root), "ckpt_path": str(tmp_path / "model.pt"),
                   "device": "$torch.device('cpu')"})
    encoder = parser.get_parsed_content("network").encoder
    assert encoder.layer2[0].conv2.stride == (1, 1) and encoder.layer4[0].conv2.dilation == (8, 8)


def test_pixel_spacing_resamples_the_slices_and_outputs_keep_the_input_grid(bundle_root, tmp_path) -> None:
    (tmp_path / "in").mkdir()
    image = write_volume(tmp_path / "in" / "case_01.nii.gz")
    parser = ConfigParser(ConfigParser.load_config_file(str(bundle_root / "configs" / "inference.yaml")))
    parser.update({"bundle_root": str(bundle_root), "pixel_spacing": [0.6, 0.6]})
    sliced = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "in" / "case_01.nii.gz")})
    voxel_mm = np.linalg.norm(np.asarray(sliced["image"].affine)[:3, :3], axis=0)
    np.testing.assert_allclose(voxel_mm, [0.6, 0.6, 1.1], atol=1e-6)  # RSA puts the 1.1 mm axis along the slices
    ckpt = tmp_path / "threshold.pt"
    torch.save(ThresholdSegmenter().state_dict(), ckpt)
    infer(bundle_root, tmp_path / "in", tmp_path / "out", ckpt, pixel_spacing=[0.6, 0.6],
          network_def={"_target_": "tests.test_inference.ThresholdSegmenter"})
    out = nib.load(str(tmp_path / "out" / "case_01_seg.nii.gz"))
    np.testing.assert_allclose(out.affine, oblique_affine(), atol=1e-5)
    prediction = np.asarray(out.dataobj)
    assert prediction.shape == image.shape
    expected = image > 0
    overlap = 2 * np.logical_and(prediction == 1, expected).sum() / ((prediction == 1).sum() + expected.sum())
    assert overlap > 0.9  # resampled there and back: the blocks' edges may move by a voxel


def test_inference_benchmark_compares_bundle_and_bare_runs(capsys) -> None:
    from scripts.benchmark import benchmark_inference

    result = benchmark_inference(shape=(32, 32, 8), encoder_width=0.125, batch_size=4, rounds=1, device="cpu")
    assert result["bundle_s_per_volume"] > 0 and result["bare_s_per_volume"] > 0
    assert result["throughput_ratio"] == pytest.approx(result["bare_s_per_volume"] / result["bundle_s_per_volume"])
    assert "throughput bundle / bare" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_model(bundle_root, tiny_dataset, tmp_path_factory):
    """model.pt of a TINY run with a width and slicing of its own (not train.yaml's 1.0 and RSA)."""
    out = tmp_path_factory.mktemp("trained")
    run("training", config_file=str(bundle_root / "configs" / "train.yaml"), bundle_root=str(bundle_root),
        dataset_dir=str(tiny_dataset.parent), output_dir=str(out), ckpt_dir=str(out), logging_file=False,
        device="$torch.device('cpu')", max_iterations=2, val_interval=1, slice_axcodes="RAS", **TINY)
    return out / "model.pt"


def test_a_trained_model_is_segmented_with_its_own_settings_from_ckpt_path_alone(bundle_root, tmp_path,
                                                                                  trained_model) -> None:
    state = torch.load(trained_model, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # still a plain state dict (Model Zoo tools)
    settings = json.loads(trained_model.with_suffix(".json").read_text(encoding="utf-8"))
    assert settings == {"encoder_width": 0.125, "output_stride": 8, "num_classes": 5,
                        "class_names": ["AA", "LAC", "LVC", "MYO"], "slice_axcodes": "RAS", "pixel_spacing": None,
                        "running_stats": "target",
                        "selection": "target_labels"}
    (tmp_path / "in").mkdir()
    write_volume(tmp_path / "in" / "case_01.nii.gz")
    infer(bundle_root, tmp_path / "in", tmp_path / "out", trained_model)
    assert nib.load(str(tmp_path / "out" / "case_01_seg.nii.gz")).shape == (37, 45, 11)
    # an explicit override the model agrees with is fine
    infer(bundle_root, tmp_path / "in", tmp_path / "again", trained_model, slice_axcodes="RAS")


def test_an_override_that_contradicts_the_model_is_one_error_line(bundle_root, tmp_path, trained_model) -> None:
    with pytest.raises(SystemExit) as stopped:
        infer(bundle_root, tmp_path, tmp_path / "out", trained_model, encoder_width=1.0)
    message = str(stopped.value.code)
    assert message.startswith("ERROR: --encoder_width 1.0 but the model was trained with 0.125 (")
    assert "\n" not in message and str(trained_model.with_suffix(".json")) in message


def test_a_missing_checkpoint_stops_before_the_engine_starts(bundle_root, tmp_path) -> None:
    (tmp_path / "in").mkdir()
    write_volume(tmp_path / "in" / "case_01.nii.gz")
    with pytest.raises(SystemExit, match=r"^ERROR: ckpt_path '.*/nowhere\.pt' does not exist: pass the model\.pt"):
        infer(bundle_root, tmp_path / "in", tmp_path / "out", tmp_path / "nowhere.pt")
    assert not (tmp_path / "out").exists()
