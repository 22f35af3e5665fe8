"""DSAN MONAI bundle: cross-modality unsupervised domain adaptation for segmentation.

Importing the package imports every module, so configs need only `$import scripts`.
"""

from scripts import (
    brain,
    checkpoints,
    data,
    demo,
    evaluation,
    inference,
    losses,
    metrics,
    networks,
    phantom,
    pseudo_labels,
    reporting,
    trainer,
    validation,
)

__all__ = [
    "brain", "checkpoints", "data", "demo", "evaluation", "inference", "losses",
    "metrics", "networks", "phantom", "pseudo_labels", "reporting", "trainer", "validation",
]
