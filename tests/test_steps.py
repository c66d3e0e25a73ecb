"""Pure step functions (vfsearch.steps), summable metrics (vfsearch.metrics) and the
schedule / checkpoint helpers of vfsearch.train: no Ray, tiny real models."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from vfsearch.config import load_config
from vfsearch.losses import build_loss, gan_d_loss
from vfsearch.metrics import confusion_counts, scores
from vfsearch.steps import eval_step, gan_step, seg_step
from vfsearch.train import build_models, optimizer_digest, warmup_cosine

torch.set_num_threads(1)

TINY = ["model.depth=3", "model.base_channels=4", "data.patch_size=32", "data.seq_len=3",
        "model.temporal=lstm", "model.norm=group"]


# -- metrics --------------------------------------------------------------------------------

def test_counts_by_hand():
    pred = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    target = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    counts = confusion_counts(pred, target)
    assert counts.tolist() == [2.0, 2.0, 1.0]
    s = scores(counts)
    assert s["dice"] == pytest.approx(4 / 7)
    assert s["iou"] == pytest.approx(2 / 5)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(2 / 3)
    per_row = confusion_counts(pred, target, dims=(1,))
    assert per_row.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def test_two_half_batches_summed_equal_one_whole_batch():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(8, 1, 16, 16, generator=g) > 0.6
    target = (torch.rand(8, 1, 16, 16, generator=g) > 0.7).float()
    whole = confusion_counts(pred, target)
    halves = confusion_counts(pred[:4], target[:4]) + confusion_counts(pred[4:], target[4:])
    assert torch.equal(whole, halves)
    assert scores(whole) == scores(halves)
    # averaging per-half Dice would differ in general: the figures come from counts only
    assert whole.dtype == torch.float64


def test_empty_policy():
    empty = torch.zeros(2, 1, 4, 4)
    assert scores(confusion_counts(empty > 0, empty)) == {
        "dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert scores((0, 0, 0), empty=0.0)["dice"] == 0.0
    # a claim on an empty target: precision 0, recall 0/0 -> 1
    assert scores((0, 3, 0)) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 1.0}
    with pytest.raises(ValueError):
        confusion_counts(torch.zeros(2, 2), torch.zeros(2, 3))


# -- steps ----------------------------------------------------------------------------------

def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 32, 32, generator=g)
    target = torch.zeros(b, 1, 32, 32)
    target[:, :, 8:20, 10:22] = 1.0
    return {"image": image, "target": target}


def test_seg_step_reduces_loss_and_clips():
    cfg = load_config(None, TINY + ["train.lr=0.01"])
    model, _ = build_models(cfg)
    loss_fn = build_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    batch = _batch()
    first = seg_step(model, batch, loss_fn, opt, grad_clip=1.0)
    assert set(first) >= {"loss", "dice", "bce", "grad_norm"}
    for _ in range(15):
        last = seg_step(model, batch, loss_fn, opt, grad_clip=1.0)
    assert last["loss"] < first["loss"]
    # clipping: after a step the clipped gradient norm is at most the threshold
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) <= 1.0 + 1e-4


def test_gan_step_updates_both_and_reports_d_g():
    cfg = load_config(None, TINY + ["model.gan=true", "loss.adv_weight=0.1",
                                    "model.disc_layers=2", "model.disc_channels=4"])
    model, disc = build_models(cfg)
    loss_fn = build_loss(cfg.loss, gan=True)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    d0 = [p.detach().clone() for p in disc.parameters()]
    g0 = [p.detach().clone() for p in model.parameters()]
    out = gan_step(model, disc, _batch(), loss_fn, opt_g, opt_d,
                   d_loss_fn=partial(gan_d_loss, cfg.loss.gan_mode), grad_clip=1.0)
    assert {"d_loss", "g_loss", "adv", "loss", "dice", "bce"} <= set(out)
    assert out["g_loss"] == out["adv"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(d0, disc.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g0, model.parameters()))
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again


def test_seg_step_leaves_discriminator_alone():
    cfg = load_config(None, TINY + ["model.gan=true", "loss.adv_weight=0.1",
                                    "model.disc_layers=2", "model.disc_channels=4"])
    model, disc = build_models(cfg)
    d0 = {k: v.clone() for k, v in disc.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seg_step(model, _batch(), build_loss(cfg.loss, gan=True), opt)
    assert all(torch.equal(d0[k], v) for k, v in disc.state_dict().items())


def test_eval_step_counts_sum_over_batches():
    cfg = load_config(None, TINY)
    model, _ = build_models(cfg)
    model.eval()
    batch = _batch(b=6)
    whole = eval_step(model, batch)
    halves = eval_step(model, {k: v[:3] for k, v in batch.items()}) + \
        eval_step(model, {k: v[3:] for k, v in batch.items()})
    assert torch.equal(whole, halves)
    assert float(whole[0] + whole[2]) == float(batch["target"].sum())  # tp + fn = positives


# -- schedule and checkpoint helpers --------------------------------------------------------

def test_warmup_cosine():
    f = partial(warmup_cosine, warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(8) == pytest.approx(0.5)
    assert f(12) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))
    assert warmup_cosine(0, warmup_steps=0, total_steps=10) == 1.0
    assert math.isclose(warmup_cosine(5, warmup_steps=0, total_steps=10), 0.5)


def test_optimizer_state_roundtrips_weights_only(tmp_path):
    cfg = load_config(None, TINY)
    model, _ = build_models(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup_steps=2,
                                                           total_steps=10))
    seg_step(model, _batch(), build_loss(cfg.loss), opt)
    sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(),
                "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict()},
               tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert optimizer_digest(back["opt"]) == optimizer_digest(opt.state_dict()) > 0
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])
    assert optimizer_digest(opt2.state_dict()) == optimizer_digest(opt.state_dict())
