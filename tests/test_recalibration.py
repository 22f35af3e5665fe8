"""Running statistics re-estimated on one domain (AdaBN): the reference docs/budget.md sets beside
``running_stats: target``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.networks import Segmenter
from scripts.recalibration import recalibrate, reestimate_running_stats
from tests.conftest import TINY


def test_running_statistics_become_the_average_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3))
    batches = [torch.randn(2, 1, 8, 8) + shift for shift in (0.0, 5.0, -2.0)]
    with torch.no_grad():
        batch_means = torch.stack([network[0](b).mean(dim=(0, 2, 3)) for b in batches])
    assert reestimate_running_stats(network, batches) == 3
    torch.testing.assert_close(network[1].running_mean, batch_means.mean(0))
    assert network[1].momentum == 0.3  # restored
    assert not network.training
    with pytest.raises(ValueError, match="no batches"):
        reestimate_running_stats(network, [])


def test_recalibrate_writes_a_model_with_target_statistics(tiny_dataset, tmp_path) -> None:
    torch.manual_seed(0)
    segmenter = Segmenter(1, 5, width=TINY["encoder_width"])
    torch.save(segmenter.state_dict(), tmp_path / "model.pt")
    message = recalibrate(tmp_path / "model.pt", tmp_path / "out" / "adabn.pt", split="target_train",
                          profile="demo", dataset_dir=str(tiny_dataset.parent), **TINY)
    assert "target_train (3 volumes, 18 batches)" in message  # 3 volumes x 12 slices, 2 slices a batch
    state = torch.load(tmp_path / "out" / "adabn.pt", weights_only=True)
    assert set(state) == set(segmenter.state_dict())
    assert not torch.equal(state["encoder.bn1.running_mean"], segmenter.state_dict()["encoder.bn1.running_mean"])
    for name, value in state.items():
        if name.startswith("encoder.conv1") or "classifier" in name:
            torch.testing.assert_close(value, segmenter.state_dict()[name])  # weights untouched
