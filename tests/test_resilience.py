"""Training and inference that survive: exact resume after kill -9, non-finite loss guards, checkpoints that
refuse to load into the wrong network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import run

from scripts.checkpoints import CheckpointMismatchError
from scripts.losses import SegmentationLoss
from scripts.networks import Segmenter
from scripts.reporting import read_history
from scripts.trainer import NonFiniteLossError
from tests.conftest import TINY
from tests.test_trainer import make_trainer, optimiser_params, snapshot


class NaNOnCall(SegmentationLoss):
    """The segmentation loss, except that its ``nan_call``-th evaluation returns NaN (an injected fault)."""

    def __init__(self, num_classes: int, nan_call: int) -> None:
        super().__init__(num_classes)
        self.nan_call, self.calls = nan_call, 0

    def forward(self, level_logits, labels):
        self.calls += 1
        loss = super().forward(level_logits, labels)
        return loss * float("nan") if self.calls == self.nan_call else loss


def cli(bundle_root, dataset_dir, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
            "['configs/train.yaml','configs/demo.yaml']", "--dataset_dir", str(dataset_dir), "--output_dir", str(out),
            "--prepare_dataset", "$lambda: None", "--max_iterations", "40", "--val_interval", "10",
            *[item for k, v in TINY.items() for item in (f"--{k}", str(v).replace(" ", ""))], *extra]


def run_uninterrupted_and_killed(command: Callable[[Path], list[str]], tmp_path: Path,
                                 cwd: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """``command(out)`` run to its end into one folder, and into another killed with SIGKILL once its second
    checkpoint exists, then rerun there: (uninterrupted folder, killed folder, the rerun's result)."""
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(command(uninterrupted), cwd=cwd, check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(command(killed), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint_epoch=2.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoint_epoch=4.pt").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(command(killed), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    return uninterrupted, killed, resumed


def test_kill_9_then_rerun_ends_in_the_state_of_an_uninterrupted_run(bundle_root, tiny_dataset, tmp_path) -> None:
    uninterrupted, killed, _ = run_uninterrupted_and_killed(
        lambda out: cli(bundle_root, tiny_dataset.parent, out), tmp_path, bundle_root)
    assert_same_final_state(uninterrupted, killed, epoch=4, iterations=40)


def assert_same_final_state(uninterrupted: Path, resumed: Path, epoch: int, iterations: int) -> None:
    """The two runs' last checkpoints hold bit-identical networks and optimiser moments, and they validated the
    same."""
    a = torch.load(uninterrupted / f"checkpoint_epoch={epoch}.pt", weights_only=True)
    b = torch.load(resumed / f"checkpoint_epoch={epoch}.pt", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == iterations
    for network in ("segmenter", "decoder_s", "decoder_t", "image_discriminator_t", "prediction_discriminators"):
        for name, tensor in a[network].items():
            torch.testing.assert_close(b[network][name], tensor, rtol=0, atol=0, msg=f"{network}.{name}")
    assert a["optimizer_seg"]["state"].keys() == b["optimizer_seg"]["state"].keys()
    torch.testing.assert_close(b["optimizer_seg"]["state"][0]["exp_avg"], a["optimizer_seg"]["state"][0]["exp_avg"],
                               rtol=0, atol=0)
    assert a["validation"]["best_metric"] == b["validation"]["best_metric"]
    assert a["grad_scaler"] == b["grad_scaler"] == {}  # amp off: the scaler is disabled and has no state
    assert validation_records(uninterrupted) == validation_records(resumed)


def validation_records(run_dir: Path) -> list[dict]:
    """The run's validation history without its wall-clock times."""
    return [{k: v for k, v in h.items() if k not in ("time", "elapsed_s")}
            for h in read_history(run_dir / "validation.json")]


def test_resume_with_persistent_data_workers_ends_in_the_state_of_an_uninterrupted_run(
        bundle_root, tiny_dataset, tmp_path) -> None:
    # 2 workers per loader, each with its own copy of the random transforms (train.yaml keeps them alive)
    common = dict(config_file=[str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")],
                  logging_file=False, dataset_dir=str(tiny_dataset.parent), prepare_dataset="$lambda: None",
                  val_interval=2, **{**TINY, "num_workers": 2})
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run("training", output_dir=str(uninterrupted), max_iterations=4, **common)
    run("training", output_dir=str(resumed), max_iterations=2, **common)
    run("training", output_dir=str(resumed), max_iterations=4, **common)
    assert_same_final_state(uninterrupted, resumed, epoch=2, iterations=4)


def test_non_finite_loss_stops_naming_the_term_and_iteration_with_weights_untouched() -> None:
    trainer = make_trainer(segmentation_loss_factory=lambda classes: NaNOnCall(classes, nan_call=1))
    before = {n: snapshot(ps) for n, ps in optimiser_params(trainer).items()}
    with pytest.raises(NonFiniteLossError, match=r"loss_seg_s = nan.*iteration 1"):
        trainer.run()
    for name, params in optimiser_params(trainer).items():
        for b, p in zip(before[name], params):
            assert torch.equal(b, p.detach()), name


def test_non_finite_loss_can_skip_the_step_instead() -> None:
    trainer = make_trainer(nonfinite="skip", max_epochs=2,
                           segmentation_loss_factory=lambda classes: NaNOnCall(classes, nan_call=1))
    trainer.run()
    assert trainer.skipped_steps == 1
    assert trainer.state.iteration == 2
    assert all(torch.isfinite(p).all() for ps in optimiser_params(trainer).values() for p in ps)


def test_nan_mid_run_keeps_the_last_good_checkpoint(bundle_root, tiny_dataset, tmp_path) -> None:
    out = tmp_path / "run"
    command = cli(bundle_root, tiny_dataset.parent, out) + [
        "--train#segmentation_loss", "{'_target_': 'tests.test_resilience.NaNOnCall', 'num_classes': 5, "
        "'nan_call': 49}"]  # L_seg runs twice per iteration: call 49 is Eq. (7) of iteration 25
    result = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("ERROR: non-finite loss")]
    assert len(message) == 1, result.stderr[-2000:]
    assert "loss_seg_s = nan" in message[0] and "at iteration 25" in message[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=2.pt"]
    state = torch.load(out / "checkpoint_epoch=2.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 20
    assert all(torch.isfinite(t).all() for t in state["segmenter"].values() if t.is_floating_point())


def test_resuming_with_another_width_lists_the_mismatched_keys(bundle_root, tiny_dataset, tmp_path) -> None:
    out = tmp_path / "run"
    common = dict(config_file=[str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")],
                  logging_file=False, dataset_dir=str(tiny_dataset.parent), output_dir=str(out),
                  prepare_dataset="$lambda: None", val_interval=2, **{k: v for k, v in TINY.items()
                                                                       if k != "encoder_width"})
    run("training", max_iterations=2, encoder_width=0.125, **common)
    mismatch = r"(?s)\[segmenter\] does not fit.*shape mismatches \(\d+\): \S+: checkpoint \("
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        run("training", max_iterations=4, encoder_width=0.25, **common)


def test_resume_restores_the_gradient_scaler_of_an_amp_run(bundle_root, tiny_dataset, tmp_path) -> None:
    out = tmp_path / "run"
    common = dict(config_file=[str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")],
                  logging_file=False, dataset_dir=str(tiny_dataset.parent), output_dir=str(out),
                  prepare_dataset="$lambda: None", val_interval=2, amp=True, **TINY)
    run("training", max_iterations=2, **common)
    first = out / "checkpoint_epoch=1.pt"
    state = torch.load(first, weights_only=True)
    assert state["grad_scaler"]["scale"] == 2.0**16  # torch's initial scale: bf16 on the CPU does not overflow
    state["grad_scaler"]["scale"] = 1024.0  # as if overflows had backed it off
    torch.save(state, first)
    run("training", max_iterations=4, **common)
    assert torch.load(out / "checkpoint_epoch=2.pt", weights_only=True)["grad_scaler"]["scale"] == 1024.0


def test_inference_with_a_checkpoint_of_another_width_says_so(bundle_root, tmp_path) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(Segmenter(1, 5, 0.125).state_dict(), ckpt)
    (tmp_path / "in").mkdir()
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.random.rand(32, 32, 4).astype(np.float32), np.eye(4)), str(tmp_path / "in/a.nii.gz"))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)model\.pt does not fit the Segmenter.*shape mismatches"):
        run(config_file=str(bundle_root / "configs/inference.yaml"), dataset_dir=str(tmp_path / "in"),
            output_dir=str(tmp_path / "out"), ckpt_path=str(ckpt), encoder_width=0.25, logging_file=False)


def test_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch) -> None:
    from scripts.checkpoints import AtomicCheckpointSaver, CheckpointWriteError

    trainer = make_trainer(max_epochs=1)
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_interval=1, n_saved=1,
                                  save_dict={"segmenter": trainer.segmenter, "trainer": trainer})
    saver.attach(trainer)
    trainer.run()
    first = tmp_path / "checkpoint_epoch=1.pt"
    before = first.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer.state.max_epochs = 2
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint checkpoint_epoch=2\.pt.*No space"):
        trainer.run()
    monkeypatch.undo()
    assert first.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]  # no partial file left
    torch.load(first, weights_only=True)


def test_unwritable_output_dir_stops_before_training(tmp_path) -> None:
    from scripts.checkpoints import CheckpointWriteError, ensure_writable

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(CheckpointWriteError, match="is not writable"):
        ensure_writable(blocker / "runs")
    assert ensure_writable(tmp_path / "new" / "runs").is_dir()


def test_best_model_file_survives_a_better_validation(tmp_path) -> None:
    from scripts.checkpoints import AtomicCheckpointSaver

    trainer = make_trainer(max_epochs=3)
    scores = iter([0.1, 0.3, 0.2])
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": trainer.segmenter},
                                  save_key_metric=True, key_metric_name="dice", key_metric_filename="model.pt")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(dice=next(scores)))
    saver.attach(trainer)
    trainer.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    torch.load(tmp_path / "model.pt", weights_only=True)
