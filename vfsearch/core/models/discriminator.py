"""Conditional PatchGAN discriminator (pix2pix, Isola et al. 2017) for the adversarial option.

It judges ``(window, mask)`` pairs: is this mask the expert's (real) or the segmenter's
(fake, sigmoid probabilities) for this CT window? One logit per overlapping patch.

Normalisation (``norm``, `DISC_NORMS`): ``spectral`` (default) puts spectral normalisation
(Miyato et al. 2018) on every conv and no norm layer; ``instance`` (affine InstanceNorm, as
later pix2pix/CycleGAN code) and ``batch`` (the original pix2pix) put a norm layer after each
inner conv. Spectral is the default: it does not depend on the batch, so the real-only and
fake-only forwards of `vfsearch.core.steps.gan_step` are normalised alike, and it keeps each
layer's gain at most about 1 (the reshaped weight's largest singular value; a conv's true
gain is within a small factor of it), so D cannot blow the tiny gap between a hard 0 and a
sigmoid's 1e-4 up into a decision. InstanceNorm normalises each sample's maps alone, which
leaves few pixels per map at the last inner layer of small patches (2x2 at
``data.patch_size`` 24 with 3 layers). BatchNorm is kept for comparison: its statistics
differ between real-only and fake-only batches.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from vfsearch.core.models.blocks import make_norm

DISC_NORMS: tuple[str, ...] = ("spectral", "instance", "batch")


class PatchDiscriminator(nn.Module):
    """``(window (B, T, H, W), mask (B, M, H, W)) -> patch logits (B, 1, h', w')``.

    ``M`` is ``mask_channels`` (1, or ``T`` when the segmenter predicts every slice); mask
    values in [0, 1]. ``layers`` stride-2 4x4 convs (``channels`` doubling, capped at 8x),
    one stride-1 conv, then a 1-channel conv: ``h' = H / 2**layers - 2`` (3 layers: the
    70x70 receptive field of pix2pix). ``norm`` is one of `DISC_NORMS` (see the module
    docstring); with ``instance``/``batch`` the first layer has no norm, as pix2pix.
    """

    def __init__(
        self,
        *,
        seq_len: int,
        mask_channels: int = 1,
        channels: int = 32,
        layers: int = 3,
        norm: str = "spectral",
    ) -> None:
        super().__init__()
        if norm not in DISC_NORMS:
            raise ValueError(
                f"unknown discriminator norm {norm!r}; expected one of {', '.join(DISC_NORMS)}"
            )
        self.seq_len = seq_len
        self.mask_channels = mask_channels
        spectral = norm == "spectral"

        def conv(cin: int, cout: int, stride: int, bias: bool = True) -> nn.Module:
            c = nn.Conv2d(cin, cout, 4, stride, 1, bias=bias)
            return spectral_norm(c) if spectral else c

        mods: list[nn.Module] = [
            conv(seq_len + mask_channels, channels, 2),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        prev = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            # a norm layer right after removes any per-channel constant: no bias then
            mods.append(conv(prev, out, stride, bias=spectral))
            if not spectral:
                mods.append(make_norm(norm, out))
            mods.append(nn.LeakyReLU(0.2, inplace=True))
            prev = out
        mods.append(conv(prev, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, window: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if window.dim() != 4 or window.shape[1] != self.seq_len:
            raise ValueError(
                f"expected a window (B, {self.seq_len}, H, W), got {tuple(window.shape)}"
            )
        if mask.shape != (window.shape[0], self.mask_channels, *window.shape[2:]):
            raise ValueError(
                f"expected a mask (B, {self.mask_channels}, H, W) matching the "
                f"window, got {tuple(mask.shape)}"
            )
        logits: torch.Tensor = self.net(torch.cat([window, mask.to(window.dtype)], dim=1))
        return logits
