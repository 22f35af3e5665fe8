"""What sharing the bundle needs: TorchScript / ONNX export matching the eager model, MLflow tracking of every
loss term, and runs from any working directory or from an unpacked copy."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ckpt_export, onnx_export, run

from scripts.networks import Segmenter
from tests.conftest import TINY

WIDTH = 0.125


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Segmenter(1, 5, WIDTH).eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return model, path


def export_args(bundle_root) -> dict:
    return {"meta_file": str(bundle_root / "configs" / "metadata.json"),
            "config_file": str(bundle_root / "configs" / "inference.yaml"), "encoder_width": WIDTH}


def test_torchscript_export_matches_eager_model(bundle_root, checkpoint, tmp_path, capsys) -> None:
    model, ckpt = checkpoint
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt),
                **export_args(bundle_root))
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert b'"network_data_format"' in extra["metadata.json"]
    x = torch.rand(2, 1, 72, 56) * 2 - 1  # any size, including sides that are not multiples of 8
    with torch.no_grad():
        difference = (scripted(x) - model(x)).abs().max().item()
    print(f"TorchScript vs eager: max abs difference {difference:.3g}")
    assert difference < 1e-5


def test_onnx_export_matches_eager_model(bundle_root, checkpoint, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, ckpt = checkpoint
    onnx_export(net_id="network_def", filepath=str(tmp_path / "model.onnx"), ckpt_file=str(ckpt),
                input_shape=[1, 1, 64, 64], **export_args(bundle_root))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 64, 64)).astype(np.float32)
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        difference = np.abs(onnx_out - model(torch.from_numpy(x)).numpy()).max()
    print(f"ONNX vs eager: max abs difference {difference:.3g}")
    assert difference < 1e-4


def test_mlflow_tracking_logs_every_loss_term_and_the_dice(bundle_root, tiny_dataset, tmp_path) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run("training", config_file=[str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")],
        tracking=str(bundle_root / "configs" / "tracking" / "mlflow.yaml"), tracking_uri=uri, logging_file=False,
        dataset_dir=str(tiny_dataset.parent), output_dir=str(tmp_path / "out"), prepare_dataset="$lambda: None",
        max_iterations=2, val_interval=2, **TINY)
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dsan").experiment_id])
    logged = set().union(*(r.data.metrics for r in runs))
    expected_losses = {"loss", "loss_rec_t", "loss_adv_t", "loss_gen_t", "loss_rec_s", "loss_adv_s", "loss_gen_s",
                       "loss_seg_s", "loss_seg_s2t", "loss_adv_p", "loss_adv_tp", "loss_adv_sec",
                       "loss_d_t", "loss_d_s", "loss_d_p", "loss_d_tp"}
    assert expected_losses <= logged
    assert {"val_mean_dice", "val_dice_AA", "val_dice_LAC", "val_dice_LVC", "val_dice_MYO"} <= logged


def copy_bundle(bundle_root, destination):
    for name in ("configs", "scripts"):
        shutil.copytree(bundle_root / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


@pytest.mark.parametrize("pass_bundle_root", [False, True])
def test_unpacked_copy_runs_from_any_working_directory(bundle_root, tiny_dataset, tmp_path, pass_bundle_root) -> None:
    copy = copy_bundle(bundle_root, tmp_path / "unpacked_bundle")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               f"['{copy}/configs/train.yaml','{copy}/configs/demo.yaml']",
               "--dataset_dir", str(tiny_dataset.parent), "--prepare_dataset", "$lambda: None",
               "--max_iterations", "2", "--val_interval", "2",
               *[item for k, v in TINY.items() for item in (f"--{k}", str(v).replace(" ", ""))]]
    if pass_bundle_root:
        command += ["--bundle_root", str(copy)]
    result = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # outputs land in the bundle's own runs/ folder, not in the working directory
    assert (copy / "runs" / "demo" / "dsan" / "checkpoint_epoch=1.pt").is_file()
    assert not any(elsewhere.iterdir())
