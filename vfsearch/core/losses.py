"""Training losses: soft Dice, BCE, focal, Tversky, their weighted sum, and GAN terms
(with `soften_real_mask`, what the discriminator sees of a real mask).

Pure torch. Shapes: ``logits`` and ``target`` are ``(B, C, *spatial)`` with the same shape
(segmentation: ``(B, 1, H, W)`` or ``(B, T, H, W)``; the baseline classifier ``(B, 1)``).
``logits`` are unbounded (a sigmoid is applied here); ``target`` values lie in [0, 1]
(binary masks {0, 1}). Every loss returns a scalar >= 0 (except the hinge / vanilla
generator terms, see `gan_g_loss`) and is computed in float32 even under AMP.

Build the training loss from the config with `build_loss`; bad option combinations fail
there with `UserError`, not in the middle of a trial.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vfsearch.core.config import LossConfig, validate_loss
from vfsearch.core.errors import UserError

GAN_MODES: tuple[str, ...] = ("vanilla", "lsgan", "hinge")
OUTPUT_KINDS: tuple[str, ...] = ("segmentation", "classification")


def _reduce_dims(x: torch.Tensor, batch: bool) -> tuple[int, ...]:
    if x.dim() < 3:
        raise ValueError(f"expected (B, C, *spatial) with spatial dims, got {tuple(x.shape)}")
    spatial = tuple(range(2, x.dim()))
    return (0, *spatial) if batch else spatial


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    batch: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """``mean(1 - (2*sum(p*t) + smooth_nr) / (sum(p) + sum(t) + smooth_dr))``, ``p = sigmoid``.

    Sums run over the spatial dims per (sample, channel), then the mean over samples and
    channels; with ``batch=True`` they run over the batch too (one Dice per channel), which
    keeps the loss meaningful when most samples have an empty mask. Equals MONAI's
    ``DiceLoss(sigmoid=True, batch=batch)`` with the same smoothing. Range [0, 1].
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    dims = _reduce_dims(p, batch)
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    return (1 - (2 * inter + smooth_nr) / (denom + smooth_dr)).mean()


def bce_loss(
    logits: torch.Tensor, target: torch.Tensor, *, pos_weight: float = 1.0
) -> torch.Tensor:
    """Mean binary cross-entropy on logits; foreground terms scaled by ``pos_weight`` (> 0)."""
    logits = logits.float()
    pw = None if pos_weight == 1.0 else logits.new_tensor(pos_weight)
    return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=pw)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), no alpha: ``mean(-(1 - p_t)**gamma * log(p_t))``.

    ``p_t`` is the probability given to the true class. ``gamma = 0`` is plain BCE.
    """
    logits = logits.float()
    t = target.float()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * t + (1 - p) * (1 - t)
    return ((1 - p_t) ** gamma * ce).mean()


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    batch: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """``mean(1 - (TP + s) / (TP + alpha*FP + beta*FN + s))`` on soft counts (Salehi 2017).

    ``beta > alpha`` penalises missed foreground more than false alarms (tiny regions).
    ``alpha = beta = 0.5`` is the soft Dice loss. Reduction as `soft_dice_loss`. Range [0, 1].
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    dims = _reduce_dims(p, batch)
    tp = (p * t).sum(dims)
    fp = (p * (1 - t)).sum(dims)
    fn = ((1 - p) * t).sum(dims)
    return (1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def _check_mode(mode: str) -> None:
    if mode not in GAN_MODES:
        raise UserError(f"loss.gan_mode: must be one of {', '.join(GAN_MODES)}, got {mode!r}")


def gan_d_loss(mode: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on its patch logits for real and fake pairs (any equal shapes).

    vanilla: ``0.5 * (BCE(real, 1) + BCE(fake, 0))``; lsgan: ``0.5 * (mean((real - 1)**2) +
    mean(fake**2))`` (Mao et al.); hinge: ``mean(relu(1 - real)) + mean(relu(1 + fake))``.
    Pass ``fake`` masks detached so this step does not train the segmenter. All >= 0.
    """
    _check_mode(mode)
    real, fake = real_logits.float(), fake_logits.float()
    if mode == "vanilla":
        return 0.5 * (
            F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        )
    if mode == "lsgan":
        return 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def gan_g_loss(mode: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator (segmenter) adversarial loss on the discriminator's logits for fake pairs.

    vanilla: non-saturating ``BCE(fake, 1)`` (>= 0); lsgan: ``mean((fake - 1)**2)`` (>= 0);
    hinge: ``-mean(fake)`` (unbounded, may be negative).
    """
    _check_mode(mode)
    fake = fake_logits.float()
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if mode == "lsgan":
        return ((fake - 1) ** 2).mean()
    return -fake.mean()


def soften_real_mask(
    mask: torch.Tensor, *, noise: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The expert's mask as the discriminator sees it: ``|mask - u|``, ``u ~ U(0, noise)``.

    ``mask (B, C, H, W)`` in {0, 1} -> same shape, 0 moved into ``[0, noise]`` and 1 into
    ``[1 - noise, 1]``, a fresh draw per pixel (soft values in [0, 1] stay in [0, 1]).

    A real mask is exactly 0/1 and a prediction (``sigmoid(logits)``) never is, so a
    discriminator could tell them apart by value alone, and the adversarial term would only
    push the segmenter towards saturated logits instead of plausible shapes (Luc et al. 2016
    describe the problem; smoothing or noising the real input is the usual remedy). Noise
    rather than a blur, which would leave the background and region interiors exactly 0/1;
    per pixel rather than one value per sample, so "only two distinct values" is no tell
    either. The cost: D may expect a background of a few hundredths, a pull the Dice/BCE
    terms outweigh and the 0.5 threshold does not see. ``noise`` in [0, 0.5); 0 returns
    ``mask`` itself. Draws from ``generator``, by default torch's global RNG of the mask's
    device, which `vfsearch.pipelines.train` seeds and checkpoints per worker: reproducible.
    """
    if not 0 <= noise < 0.5:
        raise ValueError(f"noise must lie in [0, 0.5), got {noise}")
    if noise == 0:
        return mask
    m = mask.float()
    u = torch.rand(m.shape, generator=generator, device=m.device, dtype=m.dtype) * noise
    return (m - u).abs()


def slice_labels(mask: torch.Tensor, *, min_pixels: int = 1) -> torch.Tensor:
    """Slice labels for the baseline classifier: does the centre slice show a fracture?

    ``mask (B, 1, H, W)`` (centre slice) or ``(B, T, H, W)`` (all slices; the centre
    ``T // 2`` is used), values {0, 1} -> ``(B, 1)`` float in {0, 1}: 1 where at least
    ``min_pixels`` foreground pixels.
    """
    if mask.dim() != 4:
        raise ValueError(f"expected a mask (B, 1 or T, H, W), got {tuple(mask.shape)}")
    centre = mask[:, mask.shape[1] // 2]  # (B, H, W)
    return ((centre > 0.5).flatten(1).sum(1) >= min_pixels).float()[:, None]


class SegLoss(nn.Module):
    """The weighted training loss. Build it with `build_loss`.

    ``loss(logits, target, disc_fake_logits=None) -> (total, parts)``:
    ``total = dice_weight*dice + bce_weight*bce + extra_weight*<focal|tversky>
    + adv_weight*gan_g_loss(gan_mode, disc_fake_logits)``; the adversarial term only when
    ``disc_fake_logits`` (the discriminator's logits for the segmenter's masks) is given,
    so GAN warm-up epochs simply omit it. ``parts`` holds each unweighted term, detached,
    for logging (keys ``dice``, ``bce``, and ``focal``/``tversky``/``adv`` when present).
    For ``output_kind="classification"`` (slice labels ``(B, 1)``) the loss is BCE alone.
    """

    def __init__(
        self,
        *,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        adv_weight: float = 0.0,
        batch_dice: bool = True,
        pos_weight: float = 1.0,
        extra: str = "none",
        extra_weight: float = 0.0,
        focal_gamma: float = 2.0,
        tversky_alpha: float = 0.3,
        tversky_beta: float = 0.7,
        gan_mode: str = "lsgan",
        output_kind: str = "segmentation",
    ) -> None:
        super().__init__()
        self.dice_weight, self.bce_weight, self.adv_weight = dice_weight, bce_weight, adv_weight
        self.batch_dice, self.pos_weight = batch_dice, pos_weight
        self.extra, self.extra_weight, self.focal_gamma = extra, extra_weight, focal_gamma
        self.tversky_alpha, self.tversky_beta = tversky_alpha, tversky_beta
        self.gan_mode, self.output_kind = gan_mode, output_kind

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        disc_fake_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                "must have the same shape"
            )
        bce = bce_loss(logits, target, pos_weight=self.pos_weight)
        if self.output_kind == "classification":
            return bce, {"bce": bce.detach()}
        dice = soft_dice_loss(logits, target, batch=self.batch_dice)
        total = self.dice_weight * dice + self.bce_weight * bce
        parts = {"dice": dice.detach(), "bce": bce.detach()}
        if self.extra == "focal":
            term = focal_loss(logits, target, gamma=self.focal_gamma)
        elif self.extra == "tversky":
            term = tversky_loss(
                logits,
                target,
                alpha=self.tversky_alpha,
                beta=self.tversky_beta,
                batch=self.batch_dice,
            )
        else:
            term = None
        if term is not None:
            total = total + self.extra_weight * term
            parts[self.extra] = term.detach()
        if disc_fake_logits is not None and self.adv_weight > 0:
            adv = gan_g_loss(self.gan_mode, disc_fake_logits)
            total = total + self.adv_weight * adv
            parts["adv"] = adv.detach()
        return total, parts

    def extra_repr(self) -> str:
        return (
            f"output_kind={self.output_kind!r}, dice={self.dice_weight}, "
            f"bce={self.bce_weight}, {self.extra}={self.extra_weight}, "
            f"adv={self.adv_weight}, batch_dice={self.batch_dice}"
        )


def build_loss(
    loss_cfg: LossConfig, *, gan: bool = False, output_kind: str = "segmentation"
) -> SegLoss:
    """The training loss of ``loss_cfg``; ``gan`` is ``model.gan``, ``output_kind`` the
    model's (``model.output_kind``). Invalid combinations raise `UserError` here:
    negative weights, all of dice/bce/extra weights 0, an extra weight without its term (or
    the reverse), Tversky alpha/beta outside [0, 1], ``adv_weight > 0`` without a GAN, a GAN
    with ``adv_weight = 0``, a GAN on the classifier.
    """
    if output_kind not in OUTPUT_KINDS:
        raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
    validate_loss(loss_cfg, source="config")
    if loss_cfg.adv_weight > 0 and not gan:
        raise UserError("loss.adv_weight: > 0 needs model.gan=true")
    if gan and loss_cfg.adv_weight == 0:
        raise UserError("loss.adv_weight: model.gan=true needs loss.adv_weight > 0")
    if gan and output_kind == "classification":
        raise UserError("model.gan: the slice classifier has no mask for a discriminator")
    return SegLoss(
        dice_weight=loss_cfg.dice_weight,
        bce_weight=loss_cfg.bce_weight,
        adv_weight=loss_cfg.adv_weight,
        batch_dice=loss_cfg.batch_dice,
        pos_weight=loss_cfg.pos_weight,
        extra=loss_cfg.extra,
        extra_weight=loss_cfg.extra_weight,
        focal_gamma=loss_cfg.focal_gamma,
        tversky_alpha=loss_cfg.tversky_alpha,
        tversky_beta=loss_cfg.tversky_beta,
        gan_mode=loss_cfg.gan_mode,
        output_kind=output_kind,
    )


__all__ = [
    "GAN_MODES",
    "SegLoss",
    "bce_loss",
    "build_loss",
    "focal_loss",
    "gan_d_loss",
    "gan_g_loss",
    "slice_labels",
    "soft_dice_loss",
    "soften_real_mask",
    "tversky_loss",
]
