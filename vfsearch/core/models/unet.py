"""Attention U-Net over 2.5D windows, with a temporal module at the bottleneck.

Data flow (``B`` windows of ``T`` slices, ``D`` = depth, ``c = T // 2`` the centre)::

    window (B, T, H, W)
      -> encode: every slice alone through the shared encoder          (B*T, 1, H, W)
           bottlenecks (B, T, C, H/2**D, W/2**D), skips[l] (B, T, C_l, H/2**l, W/2**l)
      -> temporal over the T bottleneck maps                           (B, T, C, h, w)
      -> decode position c with the attention-gated skips of slice c   (B, 1, H, W)

Seams: `encode` takes a flat batch of single slices, so a caller that slides over a volume
(fusion) can encode every slice once, stack the features of each window itself and call
`forward_features`. With ``temporal="none"`` (ablation) only the centre slice is encoded and
the other slices cannot change the output.
"""

from __future__ import annotations

from typing import TypedDict, cast

import torch
from torch import nn

from vfsearch.core.models.blocks import AttentionGate, ConvBlock
from vfsearch.core.models.encoders import ResNetEncoder, UNetEncoder
from vfsearch.core.models.temporal import make_temporal


class ModelOutput(TypedDict):
    """What every registered model returns (a plain dict: DDP, AMP and export handle it).

    ``logits``: segmenters ``(B, 1, H, W)`` (``(B, T, H, W)`` with ``predict_all_slices``),
    the classifier ``(B, 1)``; unbounded, apply a sigmoid for probabilities.
    ``attention``: the centre slice's attention coefficients, one ``(B, 1, H/2**l, W/2**l)``
    map in [0, 1] per skip level ``l`` (finest first); empty when gates are off or for the
    classifier.
    """

    logits: torch.Tensor
    attention: list[torch.Tensor]


class Decoder(nn.Module):
    """U-Net decoder with optional attention gates: ``(bottleneck, skips) -> (logits, alphas)``.

    Step ``l`` (coarse to fine): the gate weighs ``skips[l]`` by the gating signal ``g``
    (the current, coarser decoder map), ``g`` is upsampled by a 2x2 transposed conv, then
    concatenated with the gated skip and refined by a `ConvBlock` to ``channels[l]``.
    """

    def __init__(
        self,
        skip_channels: list[int],
        bottleneck_channels: int,
        channels: list[int],
        norm: str,
        dropout: float,
        attention: bool,
    ) -> None:
        super().__init__()
        depth = len(skip_channels)
        in_ch = [*channels[1:], bottleneck_channels]  # in_ch[l]: channels of g at step l
        self.gates = (
            nn.ModuleList(
                [
                    AttentionGate(
                        skip_channels[lv], in_ch[lv], max(skip_channels[lv] // 2, 1), norm
                    )
                    for lv in range(depth)
                ]
            )
            if attention
            else None
        )
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(in_ch[lv], channels[lv], 2, stride=2) for lv in range(depth)]
        )
        self.blocks = nn.ModuleList(
            [
                ConvBlock(channels[lv] + skip_channels[lv], channels[lv], norm, dropout)
                for lv in range(depth)
            ]
        )
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(
        self, x: torch.Tensor, skips: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        alphas: list[torch.Tensor] = []
        for lv in reversed(range(len(skips))):
            skip = skips[lv]  # (N, C_l, H_l, W_l)
            if self.gates is not None:
                skip, alpha = self.gates[lv](skip, x)  # gate from the coarser level
                alphas.insert(0, alpha)  # (N, 1, H_l, W_l)
            x = self.ups[lv](x)  # (N, channels[l], H_l, W_l)
            x = self.blocks[lv](torch.cat([x, skip], dim=1))
        return self.head(x), alphas  # (N, 1, H, W)


class AttentionUNet25D(nn.Module):
    """Attention U-Net (Oktay et al. 2018) reading a window of ``seq_len`` slices.

    Args (plain values; `vfsearch.core.models.build_model` maps a `ModelConfig` onto them):
        seq_len: slices per window ``T`` (odd); the centre slice is ``T // 2``.
        depth: encoder levels ``D`` (3..5); input sides must be divisible by ``2**D``.
        base_channels: channels of level 0, doubling per level (decoder; U-Net encoder).
        norm: ``batch`` | ``instance`` | ``group``.
        dropout: ``Dropout2d`` probability inside every conv block.
        attention: attention gates on the skips (False: plain concatenation).
        temporal: ``lstm`` (per spatial position) | ``lstm_pooled`` | ``convlstm`` | ``none``;
            see `vfsearch.core.models.temporal`.
        bidirectional: temporal module reads the window both ways.
        temporal_hidden: hidden width of the temporal module (<= 0: the bottleneck width
            capped at `vfsearch.core.models.temporal.HIDDEN_CAP`).
        predict_all_slices: decode every position of the window, ``(B, T, H, W)`` logits.
        encoder: ``unet`` | ``resnet18`` | ``resnet34``.
        encoder_weights: local torchvision state_dict for a ResNet encoder ("" = random).

    Input: ``(B, T, H, W)`` float, normalised CT. Output: `ModelOutput`.
    """

    output_kind = "segmentation"

    def __init__(
        self,
        *,
        seq_len: int,
        depth: int = 4,
        base_channels: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
        attention: bool = True,
        temporal: str = "lstm",
        bidirectional: bool = True,
        temporal_hidden: int = 0,
        predict_all_slices: bool = False,
        encoder: str = "unet",
        encoder_weights: str = "",
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.depth = depth
        self.temporal_kind = temporal
        self.predict_all_slices = predict_all_slices
        if encoder == "unet":
            if encoder_weights:
                raise ValueError("encoder_weights needs a ResNet encoder")
            self.encoder: nn.Module = UNetEncoder(depth, base_channels, norm, dropout)
        else:
            self.encoder = ResNetEncoder(
                encoder, depth, base_channels, norm, dropout, encoder_weights
            )
        c_bottleneck = self.encoder.bottleneck_channels
        self.temporal_module = make_temporal(temporal, c_bottleneck, temporal_hidden, bidirectional)
        self.decoder = Decoder(
            self.encoder.skip_channels,
            c_bottleneck,
            [base_channels * 2**lv for lv in range(depth)],
            norm,
            dropout,
            attention,
        )

    # -- seams ---------------------------------------------------------------------------

    @property
    def centre_only(self) -> bool:
        """True when the output depends on the window's centre slice alone (``temporal="none"``
        predicting the centre): a caller assembling windows (`forward_features`) need encode
        no other slice."""
        return self.temporal_kind == "none" and not self.predict_all_slices

    def encode(self, slices: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Single slices ``(N, 1, H, W)`` -> bottleneck ``(N, C, H/2**D, W/2**D)`` and skips
        ``[(N, C_l, H/2**l, W/2**l) for l in 0..D-1]``. ``N`` is any flat batch of slices."""
        return cast("tuple[torch.Tensor, list[torch.Tensor]]", self.encoder(slices))

    def temporal(self, bottlenecks: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, h, w) -> (B, T, C, h, w)``: each position refined by the window."""
        return cast(torch.Tensor, self.temporal_module(bottlenecks))

    def decode(
        self, bottleneck: torch.Tensor, skips: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(N, C, h, w)`` + skips of the same ``N`` slices -> logits ``(N, 1, H, W)`` and
        attention maps ``[(N, 1, H/2**l, W/2**l)]`` (empty without gates)."""
        return cast("tuple[torch.Tensor, list[torch.Tensor]]", self.decoder(bottleneck, skips))

    def forward_features(self, bottlenecks: torch.Tensor, skips: list[torch.Tensor]) -> ModelOutput:
        """Temporal module + decoder on encoder features a caller has assembled.

        ``bottlenecks``: ``(B, T', C, h, w)`` for the window's slices in order (``T'`` odd;
        with ``temporal="none"`` only the centre position is used, so ``T' = 1`` is fine).
        ``skips``: the centre slice's skips ``[(B, C_l, H_l, W_l)]`` for a centre
        prediction ``(B, 1, H, W)``, or every slice's ``[(B, T', C_l, H_l, W_l)]`` for
        all-slice predictions ``(B, T', H, W)``.
        """
        feats = self.temporal(bottlenecks)  # (B, T', C, h, w)
        b, t = feats.shape[:2]
        centre = t // 2
        if skips[0].dim() == 4:
            logits, alphas = self.decode(feats[:, centre], skips)  # (B, 1, H, W)
            return {"logits": logits, "attention": alphas}
        logits, alphas = self.decode(feats.flatten(0, 1), [s.flatten(0, 1) for s in skips])
        logits = logits.view(b, t, *logits.shape[-2:])  # (B, T', H, W)
        alphas = [a.view(b, t, *a.shape[1:])[:, centre] for a in alphas]  # (B, 1, H_l, W_l)
        return {"logits": logits, "attention": alphas}

    def forward(self, window: torch.Tensor) -> ModelOutput:
        """``window (B, T, H, W)`` normalised CT -> `ModelOutput`."""
        if window.dim() != 4 or window.shape[1] != self.seq_len:
            raise ValueError(
                f"expected a window (B, {self.seq_len}, H, W), got {tuple(window.shape)}"
            )
        b, t, h, w = window.shape
        if h % 2**self.depth or w % 2**self.depth:
            raise ValueError(
                f"H and W must be divisible by 2**depth = {2**self.depth}, got {h}x{w}"
            )
        if self.centre_only:
            window = window[:, t // 2 : t // 2 + 1]  # centre only: others cannot matter
            t = 1
        bottleneck, skips = self.encode(window.reshape(b * t, 1, h, w))
        bottlenecks = bottleneck.view(b, t, *bottleneck.shape[1:])  # (B, T, C, h, w)
        skips = [s.view(b, t, *s.shape[1:]) for s in skips]  # (B, T, C_l, H_l, W_l)
        if not self.predict_all_slices:
            skips = [s[:, t // 2] for s in skips]  # (B, C_l, H_l, W_l) of the centre slice
        return self.forward_features(bottlenecks, skips)

    def extra_repr(self) -> str:
        return (
            f"seq_len={self.seq_len}, depth={self.depth}, temporal={self.temporal_kind!r},"
            f" predict_all_slices={self.predict_all_slices}"
        )
