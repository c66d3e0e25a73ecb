"""The earlier study's baseline: a ResNet18 slice classifier over the window.

"Does the centre slice show a fracture?" The window's ``T`` slices are the input channels of
a torchvision-named ResNet18 (so the same pretrained weights file loads, ``conv1``
adapted to ``T`` channels); a linear head gives one logit. Train it with BCE on slice labels
derived from the masks (`vfsearch.core.losses.slice_labels`).
"""

from __future__ import annotations

import torch
from torch import nn

from vfsearch.core.models.resnet import (
    RESNET_LAYERS,
    STAGE_CHANNELS,
    init_resnet,
    load_resnet_weights,
    make_stage,
)
from vfsearch.core.models.unet import ModelOutput


class ResNetSliceClassifier(nn.Module):
    """``window (B, T, H, W)`` -> ``{"logits": (B, 1), "attention": []}``.

    ``weights``: local torchvision ResNet state_dict ("" = random); ``fc`` is not loaded.
    """

    output_kind = "classification"
    # stages registered by setattr in __init__ (torchvision names)
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self, *, seq_len: int, arch: str = "resnet18", dropout: float = 0.0, weights: str = ""
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.conv1 = nn.Conv2d(seq_len, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        stages = zip(RESNET_LAYERS[arch], STAGE_CHANNELS, strict=True)
        for s, (blocks, out_ch) in enumerate(stages, 1):
            setattr(self, f"layer{s}", make_stage(in_ch, out_ch, blocks, 1 if s == 1 else 2))
            in_ch = out_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512, 1)
        init_resnet(self)
        if weights:
            load_resnet_weights(self, weights, arch=arch)

    def forward(self, window: torch.Tensor) -> ModelOutput:
        if window.dim() != 4 or window.shape[1] != self.seq_len:
            raise ValueError(
                f"expected a window (B, {self.seq_len}, H, W), got {tuple(window.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(window))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, H/32, W/32)
        x = self.dropout(self.avgpool(x).flatten(1))  # (B, 512)
        return {"logits": self.fc(x), "attention": []}  # (B, 1)
