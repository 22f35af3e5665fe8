"""configs/train.yaml and every override parse and instantiate; the paper recipe is what train.yaml says;
pixel_spacing gives both domains' slices one pixel size; a missing dataset stops at once with instructions; a
short demo run checkpoints and resumes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from monai.transforms import Compose

from scripts.checkpoints import latest_checkpoint
from scripts.reporting import read_history
from tests.conftest import TINY

OVERRIDES = ["configs/cpu.yaml", "configs/demo.yaml", "configs/source_only.yaml"]
TOP_LEVEL_IDS = ["bundle_root", "dataset_dir", "datalist", "output_dir", "device", "seed", "max_iterations",
                 "val_interval", "batch_size", "roi_size", "encoder_width", "num_classes", "lambda_rec",
                 "lambda_adv", "lambda_gen", "lambda_seg", "lambda_secadv"]


def parser_for(bundle_root, files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_root / "configs" / "train.yaml"), *(str(bundle_root / f) for f in files)])
    parser.update({"bundle_root": str(bundle_root), **overrides})
    return parser


def data_overrides(datalist, tmp_path) -> dict:
    return {"dataset_dir": str(datalist.parent), "datalist": str(datalist), "output_dir": str(tmp_path / "out"),
            "ckpt_dir": str(tmp_path / "models")}


def test_train_yaml_is_the_paper_recipe(bundle_root) -> None:
    parser = parser_for(bundle_root, [])
    for key in TOP_LEVEL_IDS:
        assert key in parser, key
    assert parser.get_parsed_content("max_iterations") == 20000
    assert parser.get_parsed_content("batch_size") == 8
    assert parser.get_parsed_content("roi_size") == 256
    assert parser.get_parsed_content("encoder_width") == 1.0
    lambdas = {k: parser.get_parsed_content(f"lambda_{k}") for k in ("rec", "adv", "gen", "seg", "secadv")}
    assert lambdas == {"rec": 1.0, "adv": 0.01, "gen": 1.0, "seg": 1.0, "secadv": 0.1}
    lrs = {k: parser.get_parsed_content(f"lr_{k}") for k in ("seg", "dec", "d_image", "d_pred")}
    assert lrs == {"seg": 2e-4, "dec": 1e-3, "d_image": 1e-4, "d_pred": 5e-5}
    assert parser.get_parsed_content("terms") == ["gen_t", "gen_s", "seg_s", "seg_s2t", "adv_sec"]
    assert parser.get_parsed_content("pixel_spacing") is None  # the scanner's voxels, as the paper's recipe


@pytest.mark.parametrize("files", [[], ["configs/demo.yaml"], ["configs/source_only.yaml"], OVERRIDES])
def test_configs_instantiate_trainer_and_evaluator(bundle_root, tiny_dataset, tmp_path, files) -> None:
    small = TINY if files else {"num_workers": 0}  # train.yaml alone builds the paper-size networks
    parser = parser_for(bundle_root, files, **data_overrides(tiny_dataset, tmp_path), **small,
                        device="$torch.device('cpu')")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    max_iterations = parser.get_parsed_content("max_iterations")
    val_interval = parser.get_parsed_content("val_interval")
    assert trainer.state.max_epochs * trainer.state.epoch_length == max_iterations
    assert trainer.state.epoch_length == val_interval
    assert evaluator.network.segmenter is trainer.segmenter and evaluator.network.decoder_s is trainer.decoder_s
    assert trainer.terms == set(parser.get_parsed_content("terms"))
    expected_width = parser.get_parsed_content("encoder_width")
    assert trainer.segmenter.encoder.layer4_channels == int(round(512 * expected_width)) * 4


def test_source_only_override_keeps_only_eq7(bundle_root) -> None:
    assert parser_for(bundle_root, ["configs/source_only.yaml"]).get_parsed_content("terms") == ["seg_s"]


def write_ball(folder, in_plane_mm: float) -> dict[str, str]:
    """A ball of radius 12 mm, image and label, sampled every ``in_plane_mm`` in the slice plane of the default
    slice_axcodes RSA (x and z; slices along y, 2 mm apart)."""
    spacing = np.array([in_plane_mm, 2.0, in_plane_mm])
    shape = np.round(40.0 / spacing).astype(int) | 1  # about 40 mm a side, odd, so the centre is a voxel
    centre = (shape - 1) / 2
    mm = np.stack(np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij"))
    label = (np.linalg.norm(mm, axis=0) <= 12.0).astype(np.uint8)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -centre * spacing
    paths = {"image": str(folder / f"ball_{in_plane_mm}_image.nii.gz"),
             "label": str(folder / f"ball_{in_plane_mm}_label.nii.gz")}
    nib.save(nib.Nifti1Image(label * np.float32(500.0), affine), paths["image"])
    nib.save(nib.Nifti1Image(label, affine), paths["label"])
    return paths


@pytest.mark.parametrize("pixel_spacing", [None, [1.0, 1.0]])
def test_pixel_spacing_gives_both_domains_slices_one_pixel_size(bundle_root, tmp_path, pixel_spacing) -> None:
    parser = parser_for(bundle_root, [], pixel_spacing=pixel_spacing)
    preprocessing = Compose(parser.get_parsed_content("preprocessing"))
    fine, coarse = (preprocessing(write_ball(tmp_path, mm)) for mm in (1.0, 1.5))
    areas = [int(item["label"].sum()) for item in (fine, coarse)]  # foreground pixels over every slice
    if pixel_spacing is None:  # the scanner's grid: the same ball covers 1.5**2 times fewer pixels of the coarse one
        assert areas[0] / areas[1] == pytest.approx(1.5**2, rel=0.05)
        return
    assert areas[1] == pytest.approx(areas[0], rel=0.03)
    for item in (fine, coarse):
        assert item["image"].shape == item["label"].shape
        for key in ("image", "label"):
            voxel_mm = np.linalg.norm(np.asarray(item[key].affine)[:3, :3], axis=0)
            np.testing.assert_allclose(voxel_mm, [1.0, 1.0, 2.0], atol=1e-6)  # the slice axis keeps its 2 mm


def test_missing_dataset_stops_at_once_with_instructions(bundle_root, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
         "--dataset_dir", str(tmp_path / "nowhere")],
        cwd=bundle_root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr
    assert "configs/demo.yaml" in result.stderr and "datalist" in result.stderr
    assert "Traceback" not in result.stderr


def demo_run(bundle_root, datalist, out, max_iterations: int) -> None:
    run("training", config_file=[str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")],
        bundle_root=str(bundle_root), dataset_dir=str(datalist.parent), output_dir=str(out), logging_file=False,
        max_iterations=max_iterations, val_interval=2, prepare_dataset="$lambda: None",
        **{k: v for k, v in TINY.items() if k != "log_interval"}, log_interval=1)


def test_demo_run_writes_checkpoints_and_resumes(bundle_root, tiny_dataset, tmp_path, caplog) -> None:
    out = tmp_path / "demo"
    with caplog.at_level(logging.INFO, logger="dsan"):
        demo_run(bundle_root, tiny_dataset, out, max_iterations=2)
    first = latest_checkpoint(out)
    assert first is not None and first.name == "checkpoint_epoch=1.pt"
    assert (out / "model.pt").is_file()
    state = torch.load(first, weights_only=True)
    assert state["trainer"]["iteration"] == 2
    assert {"segmenter", "decoder_s", "decoder_t", "image_discriminator_s", "image_discriminator_t",
            "prediction_discriminators", "optimizer_seg", "optimizer_dec", "optimizer_d_image",
            "optimizer_d_pred", "rng"} <= set(state)
    assert [h["iteration"] for h in read_history(out / "validation.json")] == [2]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsan"):
        demo_run(bundle_root, tiny_dataset, out, max_iterations=4)
    messages = [r.getMessage() for r in caplog.records if r.name == "dsan"]
    assert any(m.startswith("resuming from") and "checkpoint_epoch=1.pt" in m for m in messages)
    iterations_logged = [int(m.split()[1].split("/")[0]) for m in messages if m.startswith("iter ")]
    assert iterations_logged == [3, 4]  # only the two remaining iterations ran
    last = latest_checkpoint(out)
    assert last.name == "checkpoint_epoch=2.pt"
    assert torch.load(last, weights_only=True)["trainer"]["iteration"] == 4
    history = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    assert [h["iteration"] for h in history] == [2, 4]
    assert all(0.0 <= h["mean_dice"] <= 1.0 for h in history)
    previews = sorted(p.name for p in (out / "translations").glob("*.png"))
    assert previews == ["iter_000002.png", "iter_000004.png"]


def test_table_v_wiring_and_pretrained_encoder_from_config(bundle_root, tiny_dataset, tmp_path) -> None:
    weights = tmp_path / "resnet50.pth"
    from scripts.networks import DeepLabResNet50Encoder

    reference = DeepLabResNet50Encoder(width=1.0)
    torch.save(reference.state_dict(), weights)
    parser = parser_for(bundle_root, [], **data_overrides(tiny_dataset, tmp_path), num_workers=0,
                        device="$torch.device('cpu')", encoder_weights=str(weights), decoder_s="@decoder_t")
    trainer = parser.get_parsed_content("train#trainer")
    torch.testing.assert_close(trainer.segmenter.encoder.layer3[5].conv2.weight, reference.layer3[5].conv2.weight)
    assert trainer.decoder_s is trainer.decoder_t
    dec_params = [p for g in trainer.generator_optimizers[1].param_groups for p in g["params"]]
    assert len(dec_params) == len({id(p) for p in dec_params}) == len(list(trainer.decoder_t.parameters()))


def test_the_demo_without_the_cpu_profile_stops_before_training(bundle_root, tmp_path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                             "['configs/train.yaml','configs/demo.yaml']", "--dataset_dir", str(tmp_path / "data"),
                             "--output_dir", str(tmp_path / "out")], cwd=bundle_root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == [line for line in errors if "configs/demo.yaml needs configs/cpu.yaml" in line] and errors
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()  # nothing generated
