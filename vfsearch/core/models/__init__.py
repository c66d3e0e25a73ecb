"""Segmentation models over 2.5D CT windows, the baseline classifier and the discriminator.

Public API::

    build_model(model_cfg, seq_len) -> nn.Module      # window (B, T, H, W) -> ModelOutput
    build_discriminator(model_cfg, seq_len) -> nn.Module
    list_models() -> list[str]                        # registered families

Every model returns ``{"logits": ..., "attention": [...]}`` (`ModelOutput`) and carries
``output_kind`` (``"segmentation"`` | ``"classification"``). Importing this package imports
torch (layer 0 compute); ``import vfsearch`` does not import it.
"""

from __future__ import annotations

from vfsearch.core.models.registry import build_discriminator, build_model, list_models, register
from vfsearch.core.models.unet import AttentionUNet25D, ModelOutput

__all__ = [
    "AttentionUNet25D",
    "ModelOutput",
    "build_discriminator",
    "build_model",
    "list_models",
    "register",
]
