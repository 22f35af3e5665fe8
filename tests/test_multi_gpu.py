"""configs/multi_gpu_train.yaml: torchrun with 2 CPU processes (gloo) trains in step and saves once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import TINY


def save_on_each_rank(expression: str, name: str) -> str:
    """A config expression saving ``expression``'s value as ``<output_dir>/<name><rank>.pt``."""
    return f"$torch.save({expression}, @output_dir + '/{name}' + str(torch.distributed.get_rank()) + '.pt')"


def test_two_cpu_ranks_draw_their_own_batches_train_in_step_and_only_rank_zero_writes(
        bundle_root, tiny_dataset, tmp_path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    # a batch larger than the 3 target volumes: each rank draws with replacement over all of them, as one
    # process does (a DistributedSampler over volumes gave each rank 2, too few for one batch)
    overrides = [item for k, v in {**TINY, "batch_size": 4}.items() for item in (f"--{k}", str(v).replace(" ", ""))]
    finalize = [save_on_each_rank("@network.state_dict()", "weights"),
                save_on_each_rank("next(iter(@train#target_loader))['image']", "target_batch"),
                "$torch.distributed.destroy_process_group()"]
    command = [
        str(torchrun) if torchrun.exists() else shutil.which("torchrun"), "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file",
        "['configs/train.yaml','configs/demo.yaml','configs/multi_gpu_train.yaml']",
        "--dataset_dir", str(tiny_dataset.parent), "--output_dir", str(out), "--prepare_dataset", "$lambda: None",
        "--max_iterations", "4", "--val_interval", "2", *overrides,
        "--finalize", "[" + ", ".join(f'"{item}"' for item in finalize) + "]",
    ]
    result = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    # gradients are averaged across ranks, so both ranks hold the same weights after every step (batch-norm
    # statistics come from rank 0 before each iteration and then see each rank's own last batch, as in DDP)
    weights = [name for name in rank0 if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > 100
    for name in weights:
        torch.testing.assert_close(rank0[name], rank1[name], msg=name)
    batch0, batch1 = (torch.load(out / f"target_batch{r}.pt", weights_only=True) for r in (0, 1))
    assert batch0.shape[0] == batch1.shape[0] == 4
    assert not torch.equal(batch0, batch1)  # each rank draws its own volumes and crops
    checkpoint = torch.load(out / "checkpoint_epoch=2.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 4
    torch.testing.assert_close(checkpoint["segmenter"]["main_classifier.branches.0.weight"],
                               rank0["main_classifier.branches.0.weight"])
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # rank 1 writes no event file
    log = result.stdout + result.stderr
    assert log.count("validation at iteration 4") == 1  # reported once, by rank 0
