"""One optimisation or evaluation step each, as pure functions (torch only, no Ray).

The training loop in `vfsearch.pipelines.train` is orchestration around these: it shards data, wraps
models in DDP, schedules the learning rate and all-reduces what these return. Unit tests call
them directly on tiny models.

Shapes: a batch is a mapping with ``image`` float32 ``(B, T, H, W)`` (T slices of a window,
normalised CT) and ``target`` float32 ``(B, 1, H, W)`` in {0, 1} (the centre slice's fracture
mask). Segmenters return logits ``(B, 1, H, W)``, either as a tensor or as the
``{"logits": ..., ...}`` dict of `vfsearch.core.models`. The discriminator maps
``(window (B, T, H, W), mask (B, 1, H, W) in [0, 1])`` to patch logits; it sees real masks
softened (`vfsearch.core.losses.soften_real_mask`), never exactly 0/1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn

from vfsearch.core.fusion import centre_logits
from vfsearch.core.losses import slice_labels, soften_real_mask
from vfsearch.core.metrics import confusion_counts

# (logits, target[, disc_fake_logits]) -> (total, terms); `vfsearch.core.losses.SegLoss` is one
LossFn = Callable[..., tuple[torch.Tensor, Mapping[str, Any]]]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output (a tensor, or a mapping with ``"logits"``)."""
    if isinstance(output, Mapping):
        return cast(torch.Tensor, output["logits"])
    return cast(torch.Tensor, output)


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """Autocast to ``dtype`` (bf16, set by `Parts.build` with ``train.amp``) on a CUDA
    ``device``; none on other devices or without ``dtype``. bf16 needs no loss scaling,
    unlike fp16."""
    if dtype is None or device.type != "cuda":
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
    logits (`vfsearch.core.losses.slice_labels`), the mask itself for segmenters."""
    if logits.dim() == 2 and target.dim() == 4:
        return slice_labels(target)
    return target


def _floats(terms: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()
    }


def _apply(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    *,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
) -> float:
    """Backward, optional unscale + clip, step. Returns the gradient norm before clipping."""
    # torch leaves Tensor.backward unannotated, hence the no-untyped-call ignores
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.unscale_(optimizer)
    else:
        loss.backward()  # type: ignore[no-untyped-call]
    params = [p for p in params if p.grad is not None]
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        # every p in params has a grad (filtered above)
        grad_norms = [cast(torch.Tensor, p.grad).detach().norm() for p in params]
        norm = float(torch.linalg.vector_norm(torch.stack(grad_norms))) if params else 0.0
    if scaler is not None and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


def seg_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """One segmentation-only step: forward, ``loss_fn``, backward, clip, optimiser step.

    ``loss_fn(logits, target) -> (total, terms)``; the loss is computed in float32 outside
    autocast. ``grad_clip`` > 0 clips the global L2 norm. Returns the loss terms as floats,
    plus ``loss`` (the total) and ``grad_norm`` (before clipping).
    """
    device = device or next(model.parameters()).device
    image, target = _to(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):
        logits = logits_of(model(image))
    total, terms = loss_fn(logits.float(), target_like(logits, target))
    norm = _apply(total, optimizer, model.parameters(), scaler=scaler, grad_clip=grad_clip)
    out = _floats(terms)
    out["loss"] = float(total.detach())
    out["grad_norm"] = norm
    return out


def gan_step(
    model: nn.Module,
    disc: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    *,
    d_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    real_noise: float = 0.1,
    device: torch.device | None = None,
) -> dict[str, float]:
    """One adversarial step: discriminator update, then segmenter update (pix2pix order).

    1. The segmenter predicts ``fake = sigmoid(logits)`` in (0, 1).
    2. The discriminator judges ``(image, real)`` and ``(image, fake.detach())`` in two
       forwards, a real-only and a fake-only batch as pix2pix does, so a batch-dependent norm
       never mixes the two; ``real`` is the target softened by `soften_real_mask` (values in
       ``[0, real_noise]`` / ``[1 - real_noise, 1]``, torch's global RNG) so that D cannot
       tell a mask from a prediction by its values being exactly 0/1. One backward of
       ``d_loss_fn(real_logits, fake_logits)`` (`vfsearch.core.losses.gan_d_loss`: the mean of
       the real and fake terms for vanilla/lsgan), then ``opt_d`` steps.
    3. With the discriminator frozen, the segmenter minimises
       ``loss_fn(logits, target, disc(image, fake))`` (the seg terms plus the weighted
       adversarial term, `vfsearch.core.losses.SegLoss`) and steps ``opt_g``. D judges the same
       kind of batch as its fake pass in step 2 (fake-only, in the caller's mode, train in
       `vfsearch.pipelines.train`), so it is normalised as it was when D learnt.

    ``disc`` may be DDP-wrapped. Step 2's two forwards feed one loss and one backward, so
    each parameter's gradient hook fires once and DDP reduces once (its buffers are
    broadcast before each forward; spectral norm clones its ``u``/``v`` before use, so that
    in-place refresh is safe); every parameter is used in both, so ``find_unused_parameters``
    is not needed (checked on 2 gloo ranks for every ``model.disc_norm``: D's weights stay
    equal across ranks). Step 3 runs the inner module so that no gradient of the frozen
    discriminator is reduced. Returns the loss terms (``adv`` is the unweighted generator
    term), ``loss`` (the total), ``d_loss``, ``g_loss`` (= ``adv``), ``grad_norm`` (the
    segmenter's, before clipping).
    """
    device = device or next(model.parameters()).device
    image, target = _to(batch, device)
    with autocast(device, amp_dtype):
        logits = logits_of(model(image))
    logits = logits.float()
    fake = torch.sigmoid(logits)
    real = soften_real_mask(target, noise=real_noise)

    # 2. discriminator: a real-only and a fake-only forward, one backward
    opt_d.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):
        d_real = disc(image, real)
        d_fake = disc(image, fake.detach())
    d_loss = d_loss_fn(d_real.float(), d_fake.float())
    _apply(d_loss, opt_d, disc.parameters(), scaler=None, grad_clip=grad_clip)

    # 3. segmenter against the frozen discriminator
    inner = getattr(disc, "module", disc)
    frozen = [p for p in inner.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        opt_g.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            judged = inner(image, fake)
        total, terms = loss_fn(logits, target, judged.float())
        norm = _apply(total, opt_g, model.parameters(), scaler=scaler, grad_clip=grad_clip)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    out = _floats(terms)
    out.update(
        loss=float(total.detach()),
        d_loss=float(d_loss.detach()),
        g_loss=out.get("adv", 0.0),
        grad_norm=norm,
    )
    return out


@torch.no_grad()
def eval_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    threshold: float = 0.5,
    *,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """TP, FP, FN (float64 ``(3,)``) of ``sigmoid(logits) > threshold`` over the batch.

    Pixels for segmenters; slices (`target_like`) for the classifier.
    The caller puts the model in eval mode. Counts are summed over every pixel of every
    slice, so they add up across batches and workers (see `vfsearch.core.metrics`).
    """
    device = device or next(model.parameters()).device
    image, target = _to(batch, device)
    with autocast(device, amp_dtype):
        logits = logits_of(model(image))
    pred = torch.sigmoid(logits.float()) > threshold
    return confusion_counts(pred, target_like(logits, target)).cpu()


def eval_volume(
    model: nn.Module,
    slices: torch.Tensor,
    target: torch.Tensor,
    seq_len: int,
    threshold: float = 0.5,
    *,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    centres: torch.Tensor | None = None,
) -> torch.Tensor:
    """TP, FP, FN (float64 ``(3,)``) of one vertebra's every window, the way `eval_step`
    counts them, with each slice encoded once.

    ``slices`` ``(n, P, P)``: the vertebra's normalised, patch-fit slices along the plane;
    ``target`` ``(n, P, P)``: their masks. Window ``t`` is slices ``t - T//2 .. t + T//2``
    edge-replicated (`vfsearch.core.windows.window_indices`), so the counts equal those of
    `eval_step` over the ``n`` windows centred on each slice (up to float rounding), at
    about a ``seq_len``-th of the encoder's work. For segmenters with the seams
    ``encode``/``forward_features`` (`vfsearch.core.fusion.centre_logits`). ``centres``
    (ascending slice indices, a CPU array or tensor): only the windows centred there
    (`vfsearch.core.sampling.strided_centres`).
    """
    device = device or next(model.parameters()).device
    x = slices.to(device, non_blocking=True)
    with torch.inference_mode(), autocast(device, amp_dtype):
        logits = centre_logits(
            model, x, seq_len, reuse=True, batch_size=batch_size, centres=centres
        )
    pred = torch.sigmoid(logits.float()) > threshold
    target = target if centres is None else target[centres]
    return confusion_counts(pred, target.to(device, non_blocking=True)).cpu()


__all__ = [
    "autocast",
    "eval_step",
    "eval_volume",
    "gan_step",
    "logits_of",
    "seg_step",
    "target_like",
]
