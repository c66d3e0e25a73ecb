"""Small 2D building blocks shared by the segmenters and the discriminator (pure torch)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

NORMS: tuple[str, ...] = ("batch", "instance", "group")


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2D normalisation layer over ``channels`` feature maps.

    ``group`` uses the largest group count <= 8 that divides ``channels``, so small test
    widths (4, 6 channels) still build. ``instance`` is affine so it carries parameters like
    the other two.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        groups = math.gcd(8, channels)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by norm and ReLU; ``Dropout2d`` between them.

    ``(N, in_ch, H, W) -> (N, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            # No bias: the norm right after removes any per-channel constant anyway.
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class AttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. 2018 (Attention U-Net, arXiv:1804.03999).

    The skip features ``x`` (fine level) are weighted by coefficients computed from ``x``
    and the gating signal ``g`` taken from the next coarser level::

        q = psi(relu(theta(x) + phi(g)))   theta: 2x2 conv, stride 2 (to g's grid)
        alpha = upsample(sigmoid(q))       in [0, 1], one map per sample
        out = W(alpha * x)                 W: 1x1 conv + norm

    Shapes: ``x (N, Cx, H, W)``, ``g (N, Cg, H/2, W/2)`` -> ``out (N, Cx, H, W)``,
    ``alpha (N, 1, H, W)``.
    """

    def __init__(self, x_ch: int, g_ch: int, inter_ch: int, norm: str) -> None:
        super().__init__()
        self.theta = nn.Conv2d(x_ch, inter_ch, 2, stride=2, bias=False)
        self.phi = nn.Conv2d(g_ch, inter_ch, 1, bias=True)
        self.psi = nn.Conv2d(inter_ch, 1, 1, bias=True)
        self.out = nn.Sequential(nn.Conv2d(x_ch, x_ch, 1, bias=False), make_norm(norm, x_ch))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta_x = self.theta(x)  # (N, Ci, H/2, W/2)
        phi_g = self.phi(g)
        if phi_g.shape[-2:] != theta_x.shape[-2:]:
            # Odd sizes (ResNet stems) can leave the grids one pixel apart.
            phi_g = F.interpolate(
                phi_g, size=theta_x.shape[-2:], mode="bilinear", align_corners=False
            )
        q = self.psi(F.relu(theta_x + phi_g))  # (N, 1, H/2, W/2)
        alpha = torch.sigmoid(q)
        alpha = F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(alpha * x), alpha  # (N, Cx, H, W), (N, 1, H, W)
