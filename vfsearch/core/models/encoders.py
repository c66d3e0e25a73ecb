"""Per-slice 2D encoders: ``(N, 1, H, W) -> (bottleneck (N, C, H/2**D, W/2**D), skips)``.

Both encoders see one slice at a time (``N`` = batch x window slices, flattened), so a caller
may encode each slice of a volume once and assemble windows of features itself (fusion).
``skips[l]`` has shape ``(N, skip_channels[l], H/2**l, W/2**l)``, finest first.
"""

from __future__ import annotations

import torch
from torch import nn

from vfsearch.core.models.blocks import ConvBlock
from vfsearch.core.models.resnet import (
    RESNET_LAYERS,
    STAGE_CHANNELS,
    init_resnet,
    load_resnet_weights,
    make_stage,
)


class UNetEncoder(nn.Module):
    """The plain U-Net encoder: ``depth`` levels of `ConvBlock` + 2x2 max-pool, then a bottleneck.

    Level ``l`` has ``base * 2**l`` channels; the bottleneck ``base * 2**depth``.
    """

    def __init__(self, depth: int, base: int, norm: str, dropout: float) -> None:
        super().__init__()
        chans = [base * 2**level for level in range(depth + 1)]
        self.levels = nn.ModuleList(
            [
                ConvBlock(1 if level == 0 else chans[level - 1], chans[level], norm, dropout)
                for level in range(depth)
            ]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(chans[depth - 1], chans[depth], norm, dropout)
        self.skip_channels: list[int] = chans[:depth]
        self.bottleneck_channels: int = chans[depth]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for level, block in enumerate(self.levels):
            x = block(x if level == 0 else self.pool(x))  # (N, C_l, H/2**l, W/2**l)
            skips.append(x)
        return self.bottleneck(self.pool(x)), skips


class ResNetEncoder(nn.Module):
    """A torchvision-compatible ResNet18/34 trunk plus a light full-resolution stem.

    Feature pyramid: ``stem`` (/1, ``base`` ch), ``conv1`` (/2, 64), ``layer1`` (/4, 64),
    ``layer2`` (/8, 128), ``layer3`` (/16, 256), ``layer4`` (/32, 512). With ``depth`` D the
    first D are the skips and the next one the bottleneck; deeper stages are not built (so
    every parameter is used). The ResNet part always uses BatchNorm, as the pretrained
    weights do; ``norm`` applies to the stem. ``weights``: local torchvision state_dict
    file, or "" for random initialisation.
    """

    def __init__(
        self, arch: str, depth: int, base: int, norm: str, dropout: float, weights: str = ""
    ) -> None:
        super().__init__()
        if arch not in RESNET_LAYERS:
            raise ValueError(f"unknown ResNet {arch!r}; expected one of {list(RESNET_LAYERS)}")
        blocks = RESNET_LAYERS[arch]
        self.depth = depth
        self.stem = ConvBlock(1, base, norm, dropout)
        self.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        chans = [base, 64]
        in_ch = 64
        # Stage s (1..4) is feature index s + 1; build only s <= depth - 1.
        for s in range(1, depth):
            out_ch = STAGE_CHANNELS[s - 1]
            stride = 1 if s == 1 else 2
            setattr(self, f"layer{s}", make_stage(in_ch, out_ch, blocks[s - 1], stride))
            chans.append(out_ch)
            in_ch = out_ch
        init_resnet(
            nn.ModuleList(
                [self.conv1, self.bn1] + [getattr(self, f"layer{s}") for s in range(1, depth)]
            )
        )
        self.skip_channels: list[int] = chans[:depth]
        self.bottleneck_channels: int = chans[depth]
        if weights:
            load_resnet_weights(self, weights, arch=arch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = [self.stem(x)]  # (N, base, H, W)
        y = self.relu(self.bn1(self.conv1(x)))  # (N, 64, H/2, W/2)
        feats.append(y)
        for s in range(1, self.depth):
            if s == 1:
                y = self.maxpool(y)
            y = getattr(self, f"layer{s}")(y)  # (N, C_s, H/2**(s+1), W/2**(s+1))
            feats.append(y)
        return feats[self.depth], feats[: self.depth]
