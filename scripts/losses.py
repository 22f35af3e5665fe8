"""DSAN's loss terms, one function per equation of Han et al. (Eq. (1)-(12)).

Conventions: images are in [-1, 1]; segmentation logits are (B, K, h, w) at any resolution and are
upsampled to the label's size; labels are (B, H, W) or (B, 1, H, W) integer class maps.

The paper writes the adversarial terms in the minimax (log D) form without naming the GAN objective;
``gan_loss`` offers least squares (default, as SIFA) and binary cross-entropy. Each adversarial
equation therefore has two sides: the generator side (E, U, C try to be judged "real") and the
discriminator side (D separates real from detached fakes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GAN_MODES = ("lsgan", "bce")
IGNORE_LABEL = 255
"""A label value no loss reads: the pixels a pseudo-label map leaves unlabelled (scripts/pseudo_labels.py)."""


def gan_loss(logits: torch.Tensor, real: bool, mode: str = "lsgan") -> torch.Tensor:
    """Loss pushing discriminator outputs ``logits`` toward the label real (1) or fake (0)."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    raise ValueError(f"GAN mode must be one of {GAN_MODES}, got {mode!r}")


def discriminator_loss(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, mode: str = "lsgan"
) -> torch.Tensor:
    """Discriminator side of one adversarial equation: real -> 1, fake -> 0, averaged.

    ``fake`` is detached here, so no gradient of this loss reaches the generator. Real and fake go through the
    discriminator as one batch, which is the same computation as two calls for a discriminator without batch
    statistics (PatchDiscriminator has none), in fewer, larger kernels.
    """
    real_logits, fake_logits = discriminator(torch.cat([real, fake.detach()])).split([len(real), len(fake)])
    return 0.5 * (gan_loss(real_logits, True, mode) + gan_loss(fake_logits, False, mode))


def image_adversarial_loss(discriminator: nn.Module, translated: torch.Tensor, mode: str = "lsgan") -> torch.Tensor:
    """Eq. (1) L_adv^t(E, U_t, D_t) with D_t(x_s->t), and Eq. (2) L_adv^s(E, U_s, D_s) with D_s(x_t->s):
    the generator side, which wants the translated image judged real."""
    return gan_loss(discriminator(translated), True, mode)


def reconstruction_loss(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Eq. (3) L_rec^t = |U_t(E(x_t)) - x_t|_1 and Eq. (4) L_rec^s = |U_s(E(x_s)) - x_s|_1 (mean over pixels)."""
    return F.l1_loss(reconstruction, image)


def generation_loss(
    reconstruction: torch.Tensor, adversarial: torch.Tensor, lambda_rec: float = 1.0, lambda_adv: float = 0.01
) -> torch.Tensor:
    """Eq. (5) L_gen^t and Eq. (6) L_gen^s = lambda_rec L_rec + lambda_adv L_adv."""
    return lambda_rec * reconstruction + lambda_adv * adversarial


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class weights 1 / (pixel count) for the classes present in ``labels`` (0 for absent ones).

    With these weights, PyTorch's weighted-mean cross-entropy is the mean over present classes of each
    class's mean pixel loss, so small structures count as much as the background.
    """
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes).to(torch.float32)
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts))


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a narrower type (amp's float16 / bfloat16), else unchanged (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 - mean over classes of the soft Dice between softmax(logits) and one-hot labels, pooled over
    the batch (so a class absent from one slice does not dominate); with ``valid`` (B, H, W) bool, over those
    pixels alone."""
    num_classes = logits.shape[1]
    probs = torch.softmax(at_least_float32(logits), dim=1)
    onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    if valid is not None:
        mask = valid.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * mask, onehot * mask
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


class SegmentationLoss(nn.Module):
    """Eq. (7) L_seg^s and Eq. (8) L_seg^s->t: sum over the classifier levels i of
    weighted cross-entropy + soft Dice of C_i's logits (upsampled to the label size) against y_s. Pixels
    labelled ``IGNORE_LABEL`` (a pseudo-label map's unlabelled ones) take no part in either; a batch with no
    other pixel gives a zero loss with zero gradients.

    ``class_weights``: "inverse_frequency" (per batch, see ``inverse_frequency_weights``), a fixed
    list of K weights, or None for unweighted cross-entropy.
    """

    def __init__(self, num_classes: int, class_weights: str | Sequence[float] | None = "inverse_frequency") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.per_batch_weights = class_weights == "inverse_frequency"
        fixed = None if class_weights is None or self.per_batch_weights else torch.as_tensor(class_weights)
        if fixed is not None and fixed.numel() != num_classes:
            raise ValueError(f"class_weights has {fixed.numel()} entries for {num_classes} classes")
        self.register_buffer("fixed_weights", fixed, persistent=False)

    def level_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = at_least_float32(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False))
        valid = labels != IGNORE_LABEL
        if valid.all():
            valid = None  # the labelled case computes exactly what it did before ignored pixels existed
        elif not valid.any():
            return logits.sum() * 0.0
        kept = labels if valid is None else labels[valid]
        weights = inverse_frequency_weights(kept, self.num_classes) if self.per_batch_weights else self.fixed_weights
        ce = F.cross_entropy(logits, labels, weight=None if weights is None else weights.to(logits),
                             ignore_index=IGNORE_LABEL)
        return ce + soft_dice_loss(logits, labels if valid is None else labels.where(valid, 0), valid=valid)

    def forward(self, level_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        labels = as_class_map(labels)
        return sum((self.level_loss(logits, labels) for logits in level_logits), torch.zeros((), device=labels.device))


def as_class_map(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) label tensor of any dtype -> (B, H, W) int64."""
    if labels.ndim == 4:
        labels = labels[:, 0]
    return labels.long()


def prediction_maps(level_logits: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
    """Softmax prediction maps of each classifier level at image size: what D_p_i sees."""
    return [
        torch.softmax(F.interpolate(lg, size=tuple(size), mode="bilinear", align_corners=False), dim=1)
        for lg in level_logits
    ]


def semantic_adversarial_loss(
    discriminators: Sequence[nn.Module], negative_maps: Sequence[torch.Tensor], mode: str = "lsgan"
) -> torch.Tensor:
    """Generator side of Eq. (9) L_adv^p and Eq. (10) L_adv^tp, summed over the levels i.

    Eq. (9): the negatives are C_i(E(x_t)); Eq. (10): the negatives are C_i(E(x_t->s)). E and C_i
    want them judged positive, i.e. like C_i(E(x_s)) resp. C_i(E(x_s->t)).
    """
    return sum(
        (gan_loss(d(p), True, mode) for d, p in zip(discriminators, negative_maps, strict=True)),
        torch.zeros((), device=negative_maps[0].device),
    )


def semantic_discriminator_loss(
    discriminators: Sequence[nn.Module],
    positive_maps: Sequence[torch.Tensor],
    negative_maps: Sequence[torch.Tensor],
    mode: str = "lsgan",
) -> torch.Tensor:
    """Discriminator side of Eq. (9) / (10), summed over levels: D_p_i tells positives from negatives."""
    return sum(
        (
            discriminator_loss(d, pos.detach(), neg, mode)
            for d, pos, neg in zip(discriminators, positive_maps, negative_maps, strict=True)
        ),
        torch.zeros((), device=positive_maps[0].device),
    )


def semantic_loss(real_images_term: torch.Tensor, translated_images_term: torch.Tensor) -> torch.Tensor:
    """Eq. (11) L_adv^sec = L_adv^p + L_adv^tp."""
    return real_images_term + translated_images_term


def total_loss(
    gen_t: torch.Tensor,
    gen_s: torch.Tensor,
    seg_s: torch.Tensor,
    seg_s2t: torch.Tensor,
    adv_sec: torch.Tensor,
    lambda_gen: float = 1.0,
    lambda_seg: float = 1.0,
    lambda_secadv: float = 0.1,
) -> torch.Tensor:
    """Eq. (12) L = lambda_gen (L_gen^t + L_gen^s) + lambda_seg (L_seg^s + L_seg^s->t) + lambda_secadv L_adv^sec."""
    return lambda_gen * (gen_t + gen_s) + lambda_seg * (seg_s + seg_s2t) + lambda_secadv * adv_sec
