"""Each loss term of Eq. (1)-(12) against a value computed by hand on a tiny tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scripts import losses


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_gan_loss_least_squares_and_bce() -> None:
    logits = t(0.5, -1.0)
    assert losses.gan_loss(logits, True, "lsgan").item() == pytest.approx((0.25 + 4.0) / 2)
    assert losses.gan_loss(logits, False, "lsgan").item() == pytest.approx((0.25 + 1.0) / 2)
    assert losses.gan_loss(t(0.0), True, "bce").item() == pytest.approx(math.log(2))
    assert losses.gan_loss(t(2.0), False, "bce").item() == pytest.approx(math.log(1 + math.exp(2.0)))
    with pytest.raises(ValueError, match="GAN mode"):
        losses.gan_loss(logits, True, "wgan")


def test_discriminator_loss_averages_real_and_detached_fake() -> None:
    fake = t(0.5).requires_grad_()
    loss = losses.discriminator_loss(nn.Identity(), t(1.0), fake, "lsgan")
    assert loss.item() == pytest.approx(0.5 * (0.0 + 0.25))
    assert not loss.requires_grad  # no gradient can reach the generator through the fake


def test_eq1_eq2_image_adversarial_generator_side() -> None:
    translated = t(0.0, 1.0).requires_grad_()
    loss = losses.image_adversarial_loss(nn.Identity(), translated, "lsgan")
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(translated.grad, t(-1.0, 0.0))  # d/dx mean((x-1)^2) = (x-1)


def test_eq3_eq4_reconstruction_is_mean_l1() -> None:
    assert losses.reconstruction_loss(t(1.0, -2.0), t(0.0, 0.0)).item() == pytest.approx(1.5)


def test_eq5_eq6_generation_loss_weights() -> None:
    assert losses.generation_loss(t(2.0), t(3.0)).item() == pytest.approx(2.0 + 0.01 * 3.0)
    assert losses.generation_loss(t(2.0), t(3.0), lambda_rec=0.5, lambda_adv=1.0).item() == pytest.approx(4.0)


def test_inverse_frequency_weights() -> None:
    weights = losses.inverse_frequency_weights(torch.tensor([0, 0, 0, 1]), num_classes=3)
    torch.testing.assert_close(weights, t(1 / 3, 1.0, 0.0))


def test_soft_dice_of_uniform_prediction() -> None:
    logits = torch.zeros(1, 2, 1, 2)  # softmax 0.5 / 0.5 everywhere
    labels = torch.tensor([[[0, 1]]])
    # per class: intersection 0.5, |p| + |g| = 1 + 1 -> Dice 0.5; loss 1 - 0.5
    assert losses.soft_dice_loss(logits, labels).item() == pytest.approx(0.5, abs=1e-5)


def test_soft_dice_of_perfect_prediction_is_zero() -> None:
    labels = torch.tensor([[[0, 1], [1, 1]]])
    logits = 50.0 * torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    assert losses.soft_dice_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-5)


def test_eq7_eq8_segmentation_loss_sums_levels_of_ce_plus_dice() -> None:
    labels = torch.tensor([[[0, 1]]])
    seg = losses.SegmentationLoss(num_classes=2)
    level = torch.zeros(1, 2, 1, 1)  # low-resolution logits are upsampled to the label's 1x2
    expected_level = math.log(2) + 0.5
    assert seg([level], labels).item() == pytest.approx(expected_level, abs=1e-5)
    assert seg([level, level], labels.unsqueeze(1)).item() == pytest.approx(2 * expected_level, abs=1e-5)


def test_segmentation_loss_fixed_class_weights() -> None:
    labels = torch.tensor([[[0, 1]]])
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # pixel 0 favours class 0, pixel 1 is uniform
    seg = losses.SegmentationLoss(num_classes=2, class_weights=[1.0, 3.0])
    ce0, ce1 = math.log(1 + math.exp(-2.0)), math.log(2)
    expected_ce = (1.0 * ce0 + 3.0 * ce1) / 4.0
    dice = losses.soft_dice_loss(logits, labels).item()
    assert seg([logits], labels).item() == pytest.approx(expected_ce + dice, abs=1e-5)
    with pytest.raises(ValueError, match="class_weights"):
        losses.SegmentationLoss(num_classes=3, class_weights=[1.0, 2.0])


def test_inverse_frequency_ce_balances_present_classes() -> None:
    labels = torch.tensor([[[0, 0, 0, 1]]])
    logits = torch.tensor([[[[1.0, 1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    seg = losses.SegmentationLoss(num_classes=2)
    ce_class0 = math.log(1 + math.exp(-1.0))  # mean loss of the three class-0 pixels
    ce_class1 = math.log(2)
    expected_ce = (ce_class0 + ce_class1) / 2
    dice = losses.soft_dice_loss(logits, labels).item()
    assert seg([logits], labels).item() == pytest.approx(expected_ce + dice, abs=1e-5)


def test_prediction_maps_are_softmax_at_image_size() -> None:
    maps = losses.prediction_maps([torch.zeros(2, 3, 4, 4)], (8, 8))
    assert maps[0].shape == (2, 3, 8, 8)
    torch.testing.assert_close(maps[0], torch.full((2, 3, 8, 8), 1 / 3))


def test_eq9_eq10_semantic_adversarial_generator_side_sums_levels() -> None:
    maps = [torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.0)]
    loss = losses.semantic_adversarial_loss([nn.Identity(), nn.Identity()], maps, "lsgan")
    assert loss.item() == pytest.approx(0.25 + 1.0)


def test_eq9_eq10_semantic_discriminator_side() -> None:
    positives = [torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)]
    negatives = [torch.zeros(1, 1, 2, 2).requires_grad_(), torch.full((1, 1, 2, 2), 0.5).requires_grad_()]
    loss = losses.semantic_discriminator_loss([nn.Identity(), nn.Identity()], positives, negatives, "lsgan")
    # level 1: 0.5 * (0 + 0); level 2: 0.5 * (0.25 + 0.25)
    assert loss.item() == pytest.approx(0.25)
    assert not loss.requires_grad


def test_eq11_and_eq12() -> None:
    assert losses.semantic_loss(t(1.5), t(2.0)).item() == pytest.approx(3.5)
    total = losses.total_loss(t(1.0), t(2.0), t(3.0), t(4.0), t(5.0))
    assert total.item() == pytest.approx(1.0 * (1 + 2) + 1.0 * (3 + 4) + 0.1 * 5)
    weighted = losses.total_loss(t(1.0), t(2.0), t(3.0), t(4.0), t(5.0), lambda_gen=2.0, lambda_seg=0.5,
                                 lambda_secadv=1.0)
    assert weighted.item() == pytest.approx(2.0 * 3 + 0.5 * 7 + 5.0)
