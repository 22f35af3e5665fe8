"""Pseudo-labels for self-training after DSAN (configs/self_training.yaml): a trained segmenter labels every
slice of the target training volumes, and per class only its most confident pixels are kept, with
class-balanced thresholds as in CBST (Zou et al., ECCV 2018): for each class c, the share ``share`` of the
pixels predicted as c with the highest confidence (the softmax probability of c). A global threshold would keep
the large, easy classes and drop the small ones; a per-class share keeps every predicted class. The pixels not
kept are ``IGNORE_LABEL``, which the segmentation loss skips.

The maps are written as NIfTI volumes in the preprocessed grid (reoriented to ``slice_axcodes``, resampled
to ``pixel_spacing`` when set) with that grid's affine, so the training transforms read them onto the same
voxels as their images.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose
from torch import nn

from scripts.checkpoints import initialised_from
from scripts.data import optional_split, preprocessed_slices
from scripts.losses import IGNORE_LABEL
from scripts.setups import bundle_config
from scripts.validation import InputError

logger = logging.getLogger("dsan")

MANIFEST = "pseudo_labels.json"


def class_balanced_thresholds(confidence: torch.Tensor, predicted: torch.Tensor, num_classes: int,
                              share: float) -> torch.Tensor:
    """(num_classes,) thresholds: for class c, the confidence of the ceil(share * n_c)-th most confident of the
    n_c pixels predicted as c, so that keeping ``confidence >= threshold[predicted]`` keeps that share of each
    class (more only where confidences tie). +inf for a class no pixel is predicted as: it keeps nothing."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"the share of pixels kept per class must be in (0, 1], got {share}")
    thresholds = torch.full((num_classes,), math.inf)
    for c in range(num_classes):
        scores = confidence[predicted == c]
        if scores.numel():
            keep = math.ceil(share * scores.numel())
            thresholds[c] = torch.topk(scores.float(), keep, sorted=True).values[-1]
    return thresholds


def confident_labels(confidence: torch.Tensor, predicted: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``predicted`` where its confidence reaches its class's threshold, ``IGNORE_LABEL`` elsewhere."""
    kept = confidence >= thresholds.to(confidence.device)[predicted]
    return torch.where(kept, predicted, torch.full_like(predicted, IGNORE_LABEL))


@torch.no_grad()
def slice_predictions(segmenter: nn.Module, slices: torch.Tensor, batch_size: int,
                      device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, predicted class) of every pixel of (D, 1, H, W) ``slices``, each (D, H, W): the segmenter in
    eval mode, as inference runs it (C_2 at image size, batch-norm running statistics), ``batch_size`` slices
    at a time."""
    was_training = segmenter.training
    segmenter.eval()
    try:
        confidence, predicted = [], []
        for batch in slices.split(batch_size):
            probabilities = torch.softmax(segmenter(batch.to(device)).float(), dim=1)
            top = probabilities.max(dim=1)
            confidence.append(top.values.cpu())
            predicted.append(top.indices.cpu())
        return torch.cat(confidence), torch.cat(predicted)
    finally:
        segmenter.train(was_training)


def predicted_volumes(segmenter: nn.Module, entries: Sequence[dict], transform: Callable, batch_size: int,
                      device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Per volume of ``entries``: (confidence, predicted class) of every pixel of its slices as
    ``slice_predictions`` gives them, and its preprocessed item (image, affine, label where the entry has one)."""
    for item in preprocessed_slices(entries, transform):
        yield (*slice_predictions(segmenter, item["image"], batch_size, device), item)


def _true_classes(item: dict) -> torch.Tensor:
    """(D, H, W) class indices of a preprocessed item's (D, 1, H, W) label slices, as uint8 (few classes)."""
    return item["label"][:, 0].to(torch.uint8)


def pseudo_label_quality(pseudo: torch.Tensor, truth: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Per foreground class, how good the kept pixels are against the true labels: ``precision`` (of the pixels
    kept as c, the share truly c), ``share_of_class`` (of the true c pixels, the share kept as c) and ``kept``
    (pixels kept as c); None where there is nothing to divide by."""
    quality = {}
    for c, name in enumerate(class_names, start=1):
        kept, true = pseudo == c, truth == c
        hits = int((kept & true).sum())
        quality[name] = {"kept": int(kept.sum()),
                         "precision": hits / int(kept.sum()) if kept.any() else None,
                         "share_of_class": hits / int(true.sum()) if true.any() else None}
    return quality


def _write_map(labels: torch.Tensor, affine: np.ndarray, path: Path) -> None:
    """(D, H, W) labels as a (H, W, D) uint8 NIfTI volume, through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    nib.save(nib.Nifti1Image(labels.permute(1, 2, 0).numpy().astype(np.uint8), affine), temporary)
    os.replace(temporary, path)


def pseudo_label_split(segmenter: nn.Module, entries: Sequence[dict], transform: Callable, *, share: float,
                       num_classes: int, class_names: Sequence[str], batch_size: int, device: torch.device | str,
                       output_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                       true_labels: Iterable[dict] | None = None) -> list[dict]:
    """Pseudo-label every volume of ``entries`` (target_train) with ``segmenter`` and return the entries with
    their pseudo-label maps as ``label``, written into ``output_dir`` with a manifest (``pseudo_labels.json``:
    the model, share, thresholds, pixels kept and, with ``true_labels`` (target_train_labels, same order), their
    quality). A folder whose manifest names the same model and share is reused as it is: a resumed self-training
    run trains on the maps it started with."""
    output_dir = Path(output_dir)
    manifest_file = output_dir / MANIFEST
    asked = {"model": None if model is None else str(Path(model).resolve()), "share": share}
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if {key: manifest.get(key) for key in asked} == asked:
            logger.info("pseudo-labels: reusing %s (model %s, share %g)", output_dir, model, share)
            return manifest["entries"]
        raise SystemExit(f"ERROR: {output_dir} holds pseudo-labels of model {manifest.get('model')} with share "
                         f"{manifest.get('share')}, not {asked['model']} with {share}: use another output_dir")
    scored = None if true_labels is None else list(true_labels)
    if scored is not None and [e["image"] for e in scored] != [e["image"] for e in entries]:
        raise InputError("target_train_labels must list the images of target_train, in the same order")
    output_dir.mkdir(parents=True, exist_ok=True)
    # one read of each volume: with true_labels, the same images come with their labels; the images themselves
    # are not kept (a real target_train is large)
    volumes = [(entry, confidence, predicted, item["affine"], None if scored is None else _true_classes(item))
               for entry, (confidence, predicted, item) in zip(
                   entries, predicted_volumes(segmenter, entries if scored is None else scored, transform, batch_size,
                                              device))]
    thresholds = class_balanced_thresholds(torch.cat([v[1].reshape(-1) for v in volumes]),
                                           torch.cat([v[2].reshape(-1) for v in volumes]), num_classes, share)
    labelled, kept = [], torch.zeros(num_classes, dtype=torch.long)
    pseudo_maps = []
    for entry, confidence, predicted, affine, _ in volumes:
        pseudo = confident_labels(confidence, predicted, thresholds)
        path = output_dir / f"{Path(entry['image']).name.split('.')[0]}_pseudo.nii.gz"
        _write_map(pseudo, affine, path)
        labelled.append({**entry, "label": str(path)})
        kept += torch.bincount(pseudo[pseudo != IGNORE_LABEL].reshape(-1), minlength=num_classes)
        pseudo_maps.append(pseudo)
    manifest = {**asked, "thresholds": [None if math.isinf(t) else t for t in thresholds.tolist()],
                "kept_pixels": dict(zip(["background", *class_names], kept.tolist())), "entries": labelled}
    if scored is not None:
        manifest["quality"] = pseudo_label_quality(torch.cat([p.reshape(-1) for p in pseudo_maps]),
                                                   torch.cat([v[4].reshape(-1) for v in volumes]), class_names)
    temporary = manifest_file.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(temporary, manifest_file)  # last: a folder without its manifest is relabelled from scratch
    logger.info("pseudo-labels: %d volumes into %s, share %g per class, kept %s%s", len(labelled), output_dir, share,
                manifest["kept_pixels"], f", quality {manifest['quality']}" if "quality" in manifest else "")
    return labelled


def share_sweep(model: str | os.PathLike, profile: str = "demo", setup: str = "full",
                shares: Sequence[float] = (1.0, 0.5, 0.2, 0.05), **overrides: object) -> str:
    """Does the model's confidence rank its correctness on the target? Markdown table: for each share of CBST
    pseudo-labels kept per class (``class_balanced_thresholds``; share 1 keeps every prediction), the precision
    and the share of the true class of the kept pixels, % per class, of ``model`` on target_train against
    target_train_labels. A diagnostic for the benchmarks, which have those labels: where precision does not rise
    as the share falls, no share gives self-training clean labels of that class.

        python -m scripts share_sweep runs/demo/dsan/model_20min.pt --profile demo
    """
    parser = bundle_config(profile, setup, **{"device": "$torch.device('cpu')", **overrides})
    labelled = optional_split(parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir"),
                              "target_train_labels")
    if labelled is None:
        raise InputError("share_sweep scores pseudo-labels against target_train_labels, which this datalist does "
                         "not have (the benchmarks' do; a user's target has no labels)")
    segmenter = initialised_from(parser.get_parsed_content("network_def"), model)
    confidence, predicted, truth = [], [], []
    transform = Compose(parser.get_parsed_content("preprocessing"))
    for scores, classes, item in predicted_volumes(segmenter, labelled, transform,
                                                   parser.get_parsed_content("batch_size"), "cpu"):
        confidence.append(scores.reshape(-1))
        predicted.append(classes.reshape(-1))
        truth.append(_true_classes(item).reshape(-1))
    confidence, predicted, truth = torch.cat(confidence), torch.cat(predicted), torch.cat(truth)
    names = parser.get_parsed_content("class_names")
    lines = [f"model: {model}", "", "| share kept | " + " | ".join(f"{n}: precision / of class" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for share in shares:
        thresholds = class_balanced_thresholds(confidence, predicted, parser.get_parsed_content("num_classes"), share)
        quality = pseudo_label_quality(confident_labels(confidence, predicted, thresholds), truth, names)
        lines.append(f"| {share:g} | " + " | ".join(f"{_percent(q['precision'])} / {_percent(q['share_of_class'])}"
                                                     for q in quality.values()) + " |")
    return "\n".join(lines)


def _percent(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{100 * ratio:.1f}"
