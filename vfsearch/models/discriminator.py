"""Conditional PatchGAN discriminator (pix2pix, Isola et al. 2017) for the adversarial option.

It judges ``(window, mask)`` pairs: is this mask the expert's (real) or the segmenter's
(fake, sigmoid probabilities) for this CT window? One logit per overlapping patch.
"""

from __future__ import annotations

import torch
from torch import nn

from vfsearch.models.blocks import make_norm


class PatchDiscriminator(nn.Module):
    """``(window (B, T, H, W), mask (B, M, H, W)) -> patch logits (B, 1, h', w')``.

    ``M`` is ``mask_channels`` (1, or ``T`` when the segmenter predicts every slice); mask
    values in [0, 1]. ``layers`` stride-2 4x4 convs (``channels`` doubling, capped at 8x),
    one stride-1 conv, then a 1-channel conv: ``h' = H / 2**layers - 2`` (3 layers: the
    70x70 receptive field of pix2pix). No norm on the first layer, as pix2pix.
    """

    def __init__(self, *, seq_len: int, mask_channels: int = 1, channels: int = 32,
                 layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        self.seq_len = seq_len
        self.mask_channels = mask_channels
        mods: list[nn.Module] = [nn.Conv2d(seq_len + mask_channels, channels, 4, 2, 1),
                                 nn.LeakyReLU(0.2, inplace=True)]
        prev = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(prev, out, 4, stride, 1, bias=False), make_norm(norm, out),
                     nn.LeakyReLU(0.2, inplace=True)]
            prev = out
        mods.append(nn.Conv2d(prev, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, window: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if window.dim() != 4 or window.shape[1] != self.seq_len:
            raise ValueError(f"expected a window (B, {self.seq_len}, H, W), "
                             f"got {tuple(window.shape)}")
        if mask.shape != (window.shape[0], self.mask_channels, *window.shape[2:]):
            raise ValueError(f"expected a mask (B, {self.mask_channels}, H, W) matching the "
                             f"window, got {tuple(mask.shape)}")
        return self.net(torch.cat([window, mask.to(window.dtype)], dim=1))
