"""Losses against hand-computed values on tiny tensors, and Dice against MONAI."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from vfsearch.core.config import LossConfig
from vfsearch.core.errors import UserError
from vfsearch.core.losses import (
    bce_loss,
    build_loss,
    focal_loss,
    gan_d_loss,
    gan_g_loss,
    slice_labels,
    soft_dice_loss,
    soften_real_mask,
    tversky_loss,
)

torch.set_num_threads(1)
BIG = 100.0  # sigmoid(+-BIG) is 1 / 0 to float precision
LN2 = math.log(2)


def t4(*values: float) -> torch.Tensor:
    """A (1, 1, 2, 2) tensor."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 2)


def test_dice_hand_values():
    target = t4(1, 0, 0, 0)
    # p = 0.5 everywhere: 1 - 2*0.5 / (2 + 1) = 2/3
    assert soft_dice_loss(t4(0, 0, 0, 0), target).item() == pytest.approx(2 / 3, abs=1e-5)
    # p = [1, 0, 1, 0]: 1 - 2*1 / (2 + 1) = 1/3
    assert soft_dice_loss(t4(BIG, -BIG, BIG, -BIG), target).item() == pytest.approx(1 / 3, abs=1e-5)
    # perfect prediction, and empty prediction on empty target (smoothing: 0/0 -> Dice 1)
    assert soft_dice_loss(t4(BIG, -BIG, -BIG, -BIG), target).item() == pytest.approx(0, abs=1e-5)
    assert soft_dice_loss(t4(-BIG, -BIG, -BIG, -BIG), t4(0, 0, 0, 0)).item() == pytest.approx(
        0, abs=1e-5
    )


def test_batch_dice_differs_from_per_sample_dice():
    # sample 0: p = t = [1, 0]  (Dice 1); sample 1: p = [1, 0], t = [0, 0]  (Dice ~0)
    logits = torch.tensor([[BIG, -BIG], [BIG, -BIG]]).view(2, 1, 1, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    assert soft_dice_loss(logits, target, batch=False).item() == pytest.approx(0.5, abs=1e-5)
    # batch: 1 - 2*1 / (2 + 1)
    assert soft_dice_loss(logits, target, batch=True).item() == pytest.approx(1 / 3, abs=1e-5)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 5, 6, 7)])
def test_dice_matches_monai(batch, shape):
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(sum(shape) + batch)
    logits = torch.randn(shape, generator=g) * 3
    target = (torch.rand(shape, generator=g) > 0.7).float()
    target[0] = 0  # one sample with an empty mask, the sparse case
    ref = DiceLoss(sigmoid=True, batch=batch, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    ours = soft_dice_loss(logits, target, batch=batch)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_bce_hand_values_and_pos_weight():
    target = t4(1, 0, 0, 0)
    assert bce_loss(t4(0, 0, 0, 0), target).item() == pytest.approx(LN2, rel=1e-6)
    # the one foreground pixel counts 3 times: (3 ln2 + 3 ln2) / 4
    assert bce_loss(t4(0, 0, 0, 0), target, pos_weight=3.0).item() == pytest.approx(
        1.5 * LN2, rel=1e-6
    )


def test_focal_and_tversky_hand_values():
    target = t4(1, 0, 0, 0)
    zeros = t4(0, 0, 0, 0)
    # p_t = 0.5 everywhere: 0.5**2 * ln2
    assert focal_loss(zeros, target, gamma=2.0).item() == pytest.approx(0.25 * LN2, rel=1e-6)
    assert focal_loss(zeros, target, gamma=0.0).item() == pytest.approx(LN2, rel=1e-6)
    # p = 0.5: TP 0.5, FP 1.5, FN 0.5 -> 1 - 0.5 / (0.5 + 0.3*1.5 + 0.7*0.5)
    assert tversky_loss(zeros, target, alpha=0.3, beta=0.7).item() == pytest.approx(
        1 - 0.5 / 1.3, rel=1e-5
    )
    # alpha = beta = 0.5 is the Dice loss
    logits = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    tgt = (torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    assert tversky_loss(logits, tgt, alpha=0.5, beta=0.5).item() == pytest.approx(
        soft_dice_loss(logits, tgt).item(), rel=1e-5
    )


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    "mode, d_expected, g_expected",
    [
        ("vanilla", 0.5 * (softplus(-2.0) + softplus(0.5)), softplus(-0.5)),
        ("lsgan", 0.5 * ((2.0 - 1) ** 2 + 0.5**2), (0.5 - 1) ** 2),
        ("hinge", max(0.0, 1 - 2.0) + max(0.0, 1 + 0.5), -0.5),
    ],
)
def test_gan_losses_hand_values(mode, d_expected, g_expected):
    real, fake = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 0.5)
    assert gan_d_loss(mode, real, fake).item() == pytest.approx(d_expected, rel=1e-6)
    assert gan_g_loss(mode, fake).item() == pytest.approx(g_expected, rel=1e-6)


def test_gan_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="loss.gan_mode"):
        gan_g_loss("wgan", torch.zeros(1))


def _exactly_binary(mask: torch.Tensor) -> torch.Tensor:
    """The trivial discriminator: per sample, are all values exactly 0 or 1? (B,) bool."""
    return ((mask == 0) | (mask == 1)).flatten(1).all(1)


def test_softened_real_masks_are_not_told_apart_by_being_exactly_binary():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(4, 1, 8, 8, generator=g) > 0.7).float()
    fake = torch.sigmoid(torch.randn(4, 1, 8, 8, generator=g) * 8)  # a confident segmenter
    # without softening the trivial rule separates real from fake perfectly ...
    assert _exactly_binary(target).all() and not _exactly_binary(fake).any()
    # ... with it, real masks fail the rule too: it calls every input fake
    real = soften_real_mask(target, noise=0.1, generator=g)
    assert not _exactly_binary(real).any()
    # and their values lie where a confident prediction's do, each pixel near its label
    assert real.shape == target.shape
    assert float((real - target).abs().max()) <= 0.1
    assert ((real <= 0.1) | (real >= 0.9)).all()
    assert real[target == 1].min() < 0.99 and real[target == 0].max() > 0.01  # spread out


def test_soften_real_mask_is_seeded_and_checks_noise():
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, 1:3, 1:3] = 1
    torch.manual_seed(3)
    a = soften_real_mask(target)
    torch.manual_seed(3)
    b = soften_real_mask(target)
    assert torch.equal(a, b)  # torch's global RNG: reproducible under manual_seed
    assert not torch.equal(a, soften_real_mask(target))  # a fresh draw each call
    assert soften_real_mask(target, noise=0.0) is target
    with pytest.raises(ValueError, match="noise"):
        soften_real_mask(target, noise=0.5)


def test_weighted_sum_and_parts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.8).float()
    fake = torch.randn(2, 1, 2, 2, generator=g)
    cfg = LossConfig(
        dice_weight=0.7,
        bce_weight=2.0,
        pos_weight=4.0,
        extra="tversky",
        extra_weight=0.5,
        adv_weight=0.1,
        gan_mode="hinge",
        batch_dice=False,
    )
    loss = build_loss(cfg, gan=True)
    total, parts = loss(logits, target, disc_fake_logits=fake)
    dice = soft_dice_loss(logits, target, batch=False)
    bce = bce_loss(logits, target, pos_weight=4.0)
    tv = tversky_loss(logits, target, alpha=0.3, beta=0.7, batch=False)
    adv = -fake.mean()
    assert total.item() == pytest.approx(
        (0.7 * dice + 2 * bce + 0.5 * tv + 0.1 * adv).item(), rel=1e-6
    )
    assert set(parts) == {"dice", "bce", "tversky", "adv"}
    assert parts["dice"].item() == pytest.approx(dice.item())
    # without discriminator logits (GAN warm-up) the adversarial term is left out
    total2, parts2 = loss(logits, target)
    assert "adv" not in parts2
    assert total2.item() == pytest.approx((0.7 * dice + 2 * bce + 0.5 * tv).item(), rel=1e-6)


def test_loss_is_float32_and_differentiable_under_half_inputs():
    logits = torch.randn(2, 1, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    total, _ = build_loss(LossConfig(extra="focal", extra_weight=1.0))(
        logits, torch.ones(2, 1, 4, 4)
    )
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_classification_loss_is_bce_on_slice_labels():
    mask = torch.zeros(3, 5, 4, 4)
    mask[0, 2, 1, 1] = 1  # centre slice fractured
    mask[1, 0, 1, 1] = 1  # only a non-centre slice
    labels = slice_labels(mask)
    assert labels.shape == (3, 1) and labels[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert slice_labels(mask[:, 2:3]).tolist() == labels.tolist()
    assert slice_labels(mask, min_pixels=2)[:, 0].tolist() == [0.0, 0.0, 0.0]
    loss = build_loss(LossConfig(pos_weight=2.0), output_kind="classification")
    logits = torch.tensor([[0.3], [-1.0], [2.0]])
    total, parts = loss(logits, labels)
    assert set(parts) == {"bce"}
    assert total.item() == pytest.approx(bce_loss(logits, labels, pos_weight=2.0).item())


@pytest.mark.parametrize(
    "changes, gan, kind, needle",
    [
        ({"dice_weight": -1.0}, False, "segmentation", "loss.dice_weight must be >= 0"),
        ({"dice_weight": 0.0, "bce_weight": 0.0}, False, "segmentation", "all 0"),
        ({"adv_weight": 0.5}, False, "segmentation", "needs model.gan=true"),
        ({}, True, "segmentation", "needs loss.adv_weight > 0"),
        ({"adv_weight": 0.5}, True, "classification", "slice classifier has no mask"),
        (
            {"extra": "tversky", "extra_weight": 1.0, "tversky_alpha": 1.5},
            False,
            "segmentation",
            "tversky_alpha",
        ),
        (
            {"extra": "tversky", "extra_weight": 1.0, "tversky_alpha": 0.0, "tversky_beta": 0.0},
            False,
            "segmentation",
            "not both 0",
        ),
        ({"extra": "focal"}, False, "segmentation", "needs loss.extra_weight > 0"),
        ({"extra_weight": 0.3}, False, "segmentation", "needs loss.extra focal or tversky"),
        (
            {"extra": "focal", "extra_weight": 1.0, "focal_gamma": -1.0},
            False,
            "segmentation",
            "focal_gamma",
        ),
        ({"pos_weight": 0.0}, False, "segmentation", "pos_weight must be > 0"),
        ({"gan_mode": "wgan"}, False, "segmentation", "gan_mode must be one of"),
    ],
)
def test_invalid_combinations_fail_at_build(changes, gan, kind, needle):
    with pytest.raises(UserError, match=needle):
        build_loss(replace(LossConfig(), **changes), gan=gan, output_kind=kind)


def test_config_validation_catches_the_same(tmp_path):
    from vfsearch.core.config import load_config

    with pytest.raises(UserError, match="needs loss.adv_weight > 0"):
        load_config(None, ["model.gan=true"])
    cfg = load_config(None, ["model.gan=true", "loss.adv_weight=0.1", "loss.gan_mode=hinge"])
    assert build_loss(cfg.loss, gan=cfg.model.gan).adv_weight == pytest.approx(0.1)
