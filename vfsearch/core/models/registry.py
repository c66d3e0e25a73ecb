"""Names -> builders. A builder maps ``(ModelConfig, seq_len)`` to an ``nn.Module``.

``family`` is the only name looked up here; temporal module, attention, encoder and the
rest are fields of the same `ModelConfig`, so one family covers every ablation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from vfsearch.core.config import ModelConfig, validate_model
from vfsearch.core.errors import UserError
from vfsearch.core.models.classifier import ResNetSliceClassifier
from vfsearch.core.models.discriminator import PatchDiscriminator
from vfsearch.core.models.unet import AttentionUNet25D

Builder = Callable[[ModelConfig, int], nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder`` available as ``model.family = name``."""

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model family {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder

    return deco


def list_models() -> list[str]:
    """Registered family names, sorted."""
    return sorted(_REGISTRY)


def build_model(model_cfg: ModelConfig, seq_len: int, *, load_weights: bool = True) -> nn.Module:
    """Build ``model_cfg.family`` for windows of ``seq_len`` slices (weights: random or file).

    The returned module has ``output_kind`` (``"segmentation"`` or ``"classification"``),
    ``seq_len`` and ``model_cfg`` (the config that rebuilds it, for the export bundle), and
    returns a `vfsearch.core.models.ModelOutput` dict. Unknown family or bad values: `UserError`.
    ``load_weights=False`` ignores ``model_cfg.encoder_weights`` (random init): for rebuilding
    a trained model whose state_dict is loaded next, where the pretrained file may not exist.
    """
    validate_model(model_cfg, source="config")
    given = model_cfg
    if not load_weights and model_cfg.encoder_weights:
        model_cfg = replace(model_cfg, encoder_weights="")
    if seq_len < 1 or seq_len % 2 == 0:
        raise UserError(f"data.seq_len: must be odd and >= 1, got {seq_len}")
    if model_cfg.family not in _REGISTRY:
        raise UserError(
            f"model.family: unknown {model_cfg.family!r}; known: {', '.join(list_models())}"
        )
    model = _REGISTRY[model_cfg.family](model_cfg, seq_len)
    model.model_cfg = given  # type: ignore[assignment]  # torch types Module.__setattr__ narrowly
    return model


def build_discriminator(model_cfg: ModelConfig, seq_len: int) -> nn.Module:
    """The conditional PatchGAN judging ``(window (B, T, H, W), mask (B, 1 or T, H, W))``."""
    validate_model(model_cfg, source="config")
    return PatchDiscriminator(
        seq_len=seq_len,
        mask_channels=seq_len if model_cfg.predict_all_slices else 1,
        channels=model_cfg.disc_channels,
        layers=model_cfg.disc_layers,
        norm=model_cfg.disc_norm,
    )


@register("attention_unet")
def _attention_unet(cfg: ModelConfig, seq_len: int) -> nn.Module:
    if cfg.encoder == "unet" and cfg.encoder_weights:
        raise UserError(
            "model.encoder_weights: pretrained weights need model.encoder resnet18 or resnet34"
        )
    return AttentionUNet25D(
        seq_len=seq_len,
        depth=cfg.depth,
        base_channels=cfg.base_channels,
        norm=cfg.norm,
        dropout=cfg.dropout,
        attention=cfg.attention,
        temporal=cfg.temporal,
        bidirectional=cfg.bidirectional,
        temporal_hidden=cfg.temporal_hidden,
        predict_all_slices=cfg.predict_all_slices,
        encoder=cfg.encoder,
        encoder_weights=cfg.encoder_weights,
    )


@register("resnet18_classifier")
def _resnet18_classifier(cfg: ModelConfig, seq_len: int) -> nn.Module:
    """Honours ``dropout`` and ``encoder_weights``; the U-Net fields do not apply."""
    return ResNetSliceClassifier(
        seq_len=seq_len, arch="resnet18", dropout=cfg.dropout, weights=cfg.encoder_weights
    )
