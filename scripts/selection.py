"""Model selection: which validation's weights become ``model.pt``, with or without target labels.

A UDA user has no target labels, so the bundle scores every validation with label-free criteria computed on the
validation volumes (``target_val``, or ``target_train`` when the datalist has no ``target_val``), next to the Dice
where labels exist. Every criterion is higher-is-better and is an evaluator metric (console, validation.json,
TensorBoard, MLflow); ``selection`` names the one the best-model saver keeps (docs/selection.md):

    selection       metric           definition
    target_labels   val_mean_dice    mean Dice on labelled target volumes (the paper's and SIFA's protocol)
    last            val_epoch        the latest validation
    confidence      val_confidence   1 - mean normalised prediction entropy of the target slices
                                     (entropy as a validation score: Morerio et al., ICLR 2018)
    info_max        val_info_max     information maximisation: entropy of the mean prediction minus the mean
                                     prediction entropy, normalised (Shi & Sha, ICML 2012; as a validator:
                                     Musgrave et al., ECCV 2022)
    symmetry        val_symmetry     Dice agreement between the segmentations of x_t and of its translation x_t->s
                                     (DSAN's symmetric design: a segmenter adapted to both domains labels an image
                                     and its translation alike)

``auto`` picks ``target_labels`` when the validation volumes have labels, else ``DEFAULT_LABEL_FREE``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.handlers import MeanDice, from_engine
from torch import nn

from scripts.networks import translate_as_in_training

logger = logging.getLogger("dsan")

METRICS = {
    "target_labels": "val_mean_dice",
    "last": "val_epoch",
    "confidence": "val_confidence",
    "info_max": "val_info_max",
    "symmetry": "val_symmetry",
}
"""Selection name -> the evaluator metric it maximises."""

SELECTIONS = ("auto", *METRICS)
LABEL_FREE = ("confidence", "info_max", "symmetry")
"""The criteria that need no label, logged at every validation as ``val_<name>``."""
DEFAULT_LABEL_FREE = "confidence"
"""What ``auto`` selects by without target labels: the label-free criterion with the least regret measured on the
demo phantom (docs/selection.md)."""


class SelectionError(SystemExit):
    """A selection the datalist cannot support: one message, no traceback."""


def resolve_selection(selection: str, labelled: bool) -> str:
    """The selection in use (``auto`` resolved), logged in one line; ``target_labels`` needs labelled volumes."""
    if selection not in SELECTIONS:
        raise SelectionError(f"ERROR: selection must be one of {list(SELECTIONS)}, got {selection!r}")
    if selection == "target_labels" and not labelled:
        raise SelectionError("ERROR: selection target_labels needs labelled target_val volumes; this datalist has "
                             f"none (choose one of {[s for s in METRICS if s != 'target_labels']}, or auto)")
    resolved = selection
    if selection == "auto":
        resolved = "target_labels" if labelled else DEFAULT_LABEL_FREE
    why = ("labelled target_val volumes: the paper's protocol" if resolved == "target_labels"
           else "no target labels used" if not labelled else "target labels logged, not used to select")
    logger.info("model selection: %s (%s; %s)", resolved, METRICS[resolved], why)
    return resolved


def normalised_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy of class probabilities (channel first), divided by log(C): 0 one-hot, 1 uniform."""
    return -(prob * prob.clamp_min(1e-12).log()).sum(0) / math.log(prob.shape[0])


def confidence(prob: torch.Tensor) -> float:
    """1 - mean normalised entropy over the pixels of one volume's (C, ...) probabilities."""
    return 1.0 - float(normalised_entropy(prob).mean())


def information_maximisation(prob: torch.Tensor) -> float:
    """H(mean p) - mean H(p) over one volume's pixels, normalised by log(C): high when each pixel is confident
    and the volume still uses several classes (entropy alone also rewards predicting background everywhere)."""
    marginal = prob.reshape(prob.shape[0], -1).mean(1)
    return float(normalised_entropy(marginal) - normalised_entropy(prob).mean())


def agreement(pred: torch.Tensor, other: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in either of two label maps (nan when neither has one)."""
    scores = []
    for c in range(1, num_classes):
        a, b = pred == c, other == c
        total = int(a.sum() + b.sum())
        if total:
            scores.append(2.0 * int((a & b).sum()) / total)
    return sum(scores) / len(scores) if scores else math.nan


class VolumeMean(Metric):
    """Mean over validation volumes of ``score`` applied to each volume's ``keys`` from the evaluator output
    (volumes where it is nan do not count)."""

    def __init__(self, score: Callable[..., float], keys: Sequence[str]) -> None:
        self.score = score
        super().__init__(output_transform=lambda output: [[item[key] for key in keys] for item in output],
                         skip_unrolling=True)  # one entry per volume, not (y_pred, y) pairs

    def reset(self) -> None:
        self._sum, self._count = 0.0, 0

    def update(self, output: Sequence[Sequence[torch.Tensor]]) -> None:
        for values in output:  # one volume each
            value = self.score(*values)
            if not math.isnan(value):
                self._sum, self._count = self._sum + value, self._count + 1

    def compute(self) -> float:
        # under torchrun each rank scores its share of the volumes: the mean is over all of them
        total, count = idist.all_reduce(torch.tensor([self._sum, float(self._count)], dtype=torch.float64)).tolist()
        return total / count if count else math.nan


class ValidationEpoch(Metric):
    """The validation's place in training (the trainer's epoch): as a selection score it keeps the last model."""

    def reset(self) -> None:
        pass

    def update(self, output: Any) -> None:
        pass

    def compute(self) -> float:
        return math.nan

    def completed(self, engine: Engine, name: str) -> None:
        engine.state.metrics[name] = engine.state.epoch


def validation_metrics(num_classes: int, labelled: bool) -> dict[str, Metric]:
    """Every criterion of the module docstring, the Dice only where the validation volumes have labels."""
    metrics = {
        "val_epoch": ValidationEpoch(),
        "val_confidence": VolumeMean(confidence, ["prob"]),
        "val_info_max": VolumeMean(information_maximisation, ["prob"]),
        "val_symmetry": VolumeMean(lambda pred, t2s: agreement(pred.argmax(0), t2s, num_classes),
                                   ["pred", "pred_t2s"]),
    }
    if labelled:
        metrics["val_mean_dice"] = MeanDice(include_background=False, save_details=True,
                                            output_transform=from_engine(["pred", "label"]))
    return metrics


def key_metric(metrics: Mapping[str, Metric], selection: str) -> dict[str, Metric]:
    """The evaluator's key metric: the one ``selection`` maximises (the evaluator's best_metric follows it)."""
    return {METRICS[selection]: metrics[METRICS[selection]]}


def additional_metrics(metrics: Mapping[str, Metric], selection: str) -> dict[str, Metric]:
    return {name: metric for name, metric in metrics.items() if name != METRICS[selection]}


class SymmetricPrediction(nn.Module):
    """The validation network: C(E(x)) and C(E(x->s)) (x translated by U_s as in training) side by side in the
    channels, so one slice-by-slice pass gives both the segmentation and the one the symmetry criterion compares
    it with. In eval mode the segmenter uses its running statistics, as inference does."""

    def __init__(self, segmenter: nn.Module, translation_encoder: nn.Module, decoder_s: nn.Module) -> None:
        super().__init__()
        self.segmenter, self.translation_encoder, self.decoder_s = segmenter, translation_encoder, decoder_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        translated = translate_as_in_training(self.translation_encoder, self.decoder_s, x)
        return torch.cat([self.segmenter(x), self.segmenter(translated)], dim=1)


class SplitSymmetricPrediction:
    """Postprocessing of ``SymmetricPrediction``'s output: ``pred`` keeps the segmentation's logits, ``prob`` their
    softmax, ``pred_t2s`` the label map of the translation's; a label the volume does not have is dropped."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        item = {key: value for key, value in item.items() if value is not None}
        logits, logits_t2s = item["pred"][: self.num_classes], item["pred"][self.num_classes:]
        item.update(pred=logits, prob=torch.softmax(torch.as_tensor(logits), 0),
                    pred_t2s=torch.as_tensor(logits_t2s).argmax(0))
        return item
