"""Does x_s->t render each structure with the target modality's intensity? A diagnostic for a trained run on a
dataset whose target training volumes have labels (the phantom's ``target_train_labels``): the mean intensity of
each class in x_s->t = U_t(E(x_s)) over the source training volumes (classes from y_s), beside the same class
in the real source and real target images. A histogram distance cannot tell a right contrast per structure from
a right mix of intensities; this can. Beside it, U_t(E(x_t)) over the target training volumes: what U_t renders
of a real target image, the most it can give x_s->t. Where even that misses a structure's intensity, the decoder
cannot draw the structure at E's resolution, and no adversarial weight will make x_s->t draw it.

    python -m scripts translation_check runs/budget/full --profile demo --setup full
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from scripts.checkpoints import latest_checkpoint
from scripts.data import preprocessed_slices, read_split
from scripts.metrics import class_intensity_sums
from scripts.networks import translate_as_in_training
from scripts.setups import bundle_config


def _class_means(parser: ConfigParser, split: str, translate: Callable | None = None) -> torch.Tensor:
    """(num_classes, 1 or 2) mean image intensity per class over every slice of a split: of the images, and
    with ``translate`` also of their translations (each volume read once, translated ``batch_size`` slices at a
    time)."""
    transform = Compose(parser.get_parsed_content("preprocessing"))
    num_classes, batch_size = parser.get_parsed_content("num_classes"), parser.get_parsed_content("batch_size")
    totals = torch.zeros(num_classes, 2, 1 if translate is None else 2)
    entries = read_split(parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir"), split)
    for item in preprocessed_slices(entries, transform):
        images, labels = item["image"], item["label"]
        totals[..., 0] += class_intensity_sums(images, labels, num_classes)
        if translate is not None:
            translated = torch.cat([translate(batch) for batch in images.split(batch_size)])
            totals[..., 1] += class_intensity_sums(translated, labels, num_classes)
    return totals[:, 0] / totals[:, 1].clamp(min=1)


def translation_check(run_dir: str | os.PathLike, profile: str = "demo", setup: str = "full",
                      **overrides: object) -> str:
    """Markdown table: per class, the mean intensity of x_s, x_t, x_s->t and x_t->t = U_t(E(x_t)) (the latest
    checkpoint in ``run_dir``), and how far x_s->t is from x_t, against how far x_s is."""
    parser = bundle_config(profile, setup, **{"device": "$torch.device('cpu')", **overrides})
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is None:
        raise SystemExit(f"ERROR: no checkpoint_epoch=N.pt in {run_dir}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    encoder, decoder = parser.get_parsed_content("translation_encoder"), parser.get_parsed_content("decoder_t")
    encoder.load_state_dict(state["translation_encoder"])
    decoder.load_state_dict(state["decoder_t"])
    to_target = partial(translate_as_in_training, encoder, decoder)
    source, translated = _class_means(parser, "source_train", to_target).unbind(1)
    target, reconstructed = _class_means(parser, "target_train_labels", to_target).unbind(1)
    names = ["background", *parser.get_parsed_content("class_names")]
    lines = [f"checkpoint: {checkpoint}", "",
             "| class | x_s | x_t | x_s->t | x_t->t | abs(x_s->t - x_t) | abs(x_s - x_t) |",
             "|---|---|---|---|---|---|---|"]
    for name, s, t, st, tt in zip(names, source.tolist(), target.tolist(), translated.tolist(),
                                  reconstructed.tolist()):
        lines.append(f"| {name} | {s:.3f} | {t:.3f} | {st:.3f} | {tt:.3f} | {abs(st - t):.3f} | {abs(s - t):.3f} |")
    return "\n".join(lines)
