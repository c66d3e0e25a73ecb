"""One optimisation or evaluation step each, as pure functions (torch only, no Ray).

The training loop in `vfsearch.train` is orchestration around these: it shards data, wraps
models in DDP, schedules the learning rate and all-reduces what these return. Unit tests call
them directly on tiny models.

Shapes: a batch is a mapping with ``image`` float32 ``(B, T, H, W)`` (T slices of a window,
normalised CT) and ``target`` float32 ``(B, 1, H, W)`` in {0, 1} (the centre slice's fracture
mask). Segmenters return logits ``(B, 1, H, W)``, either as a tensor or as the
``{"logits": ..., ...}`` dict of `vfsearch.models`. The discriminator maps
``(window (B, T, H, W), mask (B, 1, H, W) in [0, 1])`` to patch logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vfsearch.metrics import confusion_counts

# (logits, target[, disc_fake_logits]) -> (total, terms); `vfsearch.losses.SegLoss` is one
LossFn = Callable[..., tuple[torch.Tensor, Mapping[str, Any]]]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output (a tensor, or a mapping with ``"logits"``)."""
    if isinstance(output, Mapping):
        return output["logits"]
    return output


def _autocast(device: torch.device, dtype: torch.dtype | None):
    # bf16 autocast only: it needs no loss scaling, unlike fp16
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to(batch: Mapping[str, Any], device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    image, target = batch["image"], batch["target"]
    if device is not None:
        image = image.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
    return image, target


def target_like(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The target in the logits' form: slice labels ``(B, 1)`` for the classifier's ``(B, 1)``
    logits (`vfsearch.losses.slice_labels`), the mask itself for segmenters."""
    if logits.dim() == 2 and target.dim() == 4:
        from vfsearch.losses import slice_labels

        return slice_labels(target)
    return target


def _floats(terms: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in terms.items()}


def _apply(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, *,
           scaler: torch.amp.GradScaler | None, grad_clip: float) -> float:
    """Backward, optional unscale + clip, step. Returns the gradient norm before clipping."""
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    params = [p for p in params if p.grad is not None]
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        norm = float(torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in params]))) if params else 0.0
    if scaler is not None and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


def seg_step(model: nn.Module, batch: Mapping[str, Any], loss_fn: LossFn,
             optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None,
             grad_clip: float = 0.0, amp_dtype: torch.dtype | None = None,
             device: torch.device | None = None) -> dict[str, float]:
    """One segmentation-only step: forward, ``loss_fn``, backward, clip, optimiser step.

    ``loss_fn(logits, target) -> (total, terms)``; the loss is computed in float32 outside
    autocast. ``grad_clip`` > 0 clips the global L2 norm. Returns the loss terms as floats,
    plus ``loss`` (the total) and ``grad_norm`` (before clipping).
    """
    device = device or next(model.parameters()).device
    image, target = _to(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, amp_dtype):
        logits = logits_of(model(image))
    total, terms = loss_fn(logits.float(), target_like(logits, target))
    norm = _apply(total, optimizer, model.parameters(), scaler=scaler, grad_clip=grad_clip)
    out = _floats(terms)
    out["loss"] = float(total.detach())
    out["grad_norm"] = norm
    return out


def gan_step(model: nn.Module, disc: nn.Module, batch: Mapping[str, Any], loss_fn: LossFn,
             opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, *,
             d_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0,
             amp_dtype: torch.dtype | None = None,
             device: torch.device | None = None) -> dict[str, float]:
    """One adversarial step: discriminator update, then segmenter update (pix2pix order).

    1. The segmenter predicts ``fake = sigmoid(logits)``.
    2. The discriminator judges ``(image, target)`` as real and ``(image, fake.detach())`` as
       fake in one forward (one DDP reduction), ``d_loss_fn(real_logits, fake_logits)``, and
       steps ``opt_d``.
    3. With the discriminator frozen, the segmenter minimises
       ``loss_fn(logits, target, disc(image, fake))`` (the seg terms plus the weighted
       adversarial term, `vfsearch.losses.SegLoss`) and steps ``opt_g``.

    ``disc`` may be DDP-wrapped: step 3 runs its inner module so that no gradient of the
    frozen discriminator is reduced. Returns the loss terms (``adv`` is the unweighted
    generator term), ``loss`` (the total), ``d_loss``, ``g_loss`` (= ``adv``), ``grad_norm``.
    """
    device = device or next(model.parameters()).device
    image, target = _to(batch, device)
    with _autocast(device, amp_dtype):
        logits = logits_of(model(image))
    logits = logits.float()
    fake = torch.sigmoid(logits)

    # 2. discriminator: real and fake pairs in one batch
    opt_d.zero_grad(set_to_none=True)
    with _autocast(device, amp_dtype):
        both = disc(torch.cat([image, image]), torch.cat([target, fake.detach()]))
    d_real, d_fake = both.float().chunk(2)
    d_loss = d_loss_fn(d_real, d_fake)
    _apply(d_loss, opt_d, disc.parameters(), scaler=None, grad_clip=grad_clip)

    # 3. segmenter against the frozen discriminator
    inner = getattr(disc, "module", disc)
    frozen = [p for p in inner.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        opt_g.zero_grad(set_to_none=True)
        with _autocast(device, amp_dtype):
            judged = inner(image, fake)
        total, terms = loss_fn(logits, target, judged.float())
        norm = _apply(total, opt_g, model.parameters(), scaler=scaler, grad_clip=grad_clip)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    out = _floats(terms)
    out.update(loss=float(total.detach()), d_loss=float(d_loss.detach()),
               g_loss=out.get("adv", 0.0), grad_norm=norm)
    return out


@torch.no_grad()
def eval_step(model: nn.Module, batch: Mapping[str, Any], threshold: float = 0.5, *,
              amp_dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> torch.Tensor:
    """TP, FP, FN (float64 ``(3,)``) of ``sigmoid(logits) > threshold`` over the batch.

    Pixels for segmenters; slices (`target_like`) for the classifier.
    The caller puts the model in eval mode. Counts are summed over every pixel of every
    slice, so they add up across batches and workers (see `vfsearch.metrics`).
    """
    device = device or next(model.parameters()).device
    image, target = _to(batch, device)
    with _autocast(device, amp_dtype):
        logits = logits_of(model(image))
    pred = torch.sigmoid(logits.float()) > threshold
    return confusion_counts(pred, target_like(logits, target)).cpu()


__all__ = ["seg_step", "gan_step", "eval_step", "logits_of", "target_like"]
