"""Batch-norm running statistics re-estimated on one domain's images (AdaBN, Li et al. 2016): a reference for
how much of an adapted model's gain a source-only model would get from target statistics alone, without any
adaptation in training. docs/budget.md uses it beside ``running_stats: target``.

    python -m scripts recalibrate runs/budget/source_only/model.pt runs/source_only_adabn.pt --split target_train
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from monai.transforms import Compose
from torch import nn

from scripts.checkpoints import read_model_settings, write_model_settings
from scripts.data import preprocessed_slices, read_split
from scripts.networks import batch_norm_momentum
from scripts.setups import bundle_config


def reestimate_running_stats(network: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of every batch norm of ``network`` by their plain average over ``batches``
    (a forward pass each, no weight changes); the network is left in eval mode. Returns the number of batches."""
    count = 0
    with batch_norm_momentum(network, None) as norms, torch.no_grad():
        for m in norms:
            m.reset_running_stats()
        network.train()
        for batch in batches:
            network(batch)
            count += 1
    network.eval()
    if count == 0:
        raise ValueError("no batches to estimate the running statistics from")
    return count


def recalibrate(model: str | os.PathLike, output: str | os.PathLike, split: str = "target_train",
                profile: str = "demo", **overrides: object) -> str:
    """Write ``model`` (a segmenter state dict, e.g. a best model.pt) to ``output`` with its batch-norm running
    statistics re-estimated over every slice of the datalist split ``split``, ``batch_size`` slices at a time,
    and beside it the model's settings (its model.json, which inference and evaluation rebuild the network from)
    with the split they were re-estimated on."""
    parser = bundle_config(profile, "full", **{"device": "$torch.device('cpu')", **overrides})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(model, map_location="cpu", weights_only=True))
    transform = Compose(parser.get_parsed_content("preprocessing"))
    batch_size = parser.get_parsed_content("batch_size")
    entries = read_split(parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir"), split)
    batches = (batch for item in preprocessed_slices(entries, transform) for batch in item["image"].split(batch_size))
    count = reestimate_running_stats(network, batches)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), output)
    settings = read_model_settings(model)
    if settings:
        write_model_settings(output, {**settings, "batch_norm_statistics_of": split})
    return f"{output}: running statistics of {model} re-estimated on {split} ({len(entries)} volumes, {count} batches)"
