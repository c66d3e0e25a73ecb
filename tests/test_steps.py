"""Pure step functions (vfsearch.core.steps), summable metrics (vfsearch.core.metrics) and the
schedule / checkpoint helpers of vfsearch.pipelines.train: no Ray, tiny real models."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from vfsearch.core.config import TrainConfig, load_config
from vfsearch.core.errors import UserError
from vfsearch.core.losses import build_loss, gan_d_loss
from vfsearch.core.metrics import confusion_counts, scores
from vfsearch.core.models.discriminator import DISC_NORMS, PatchDiscriminator
from vfsearch.core.steps import eval_step, gan_step, seg_step
from vfsearch.pipelines.train.loop import build_models, optimizer_digest, warmup_cosine

torch.set_num_threads(1)

TINY = [
    "model.depth=3",
    "model.base_channels=4",
    "data.patch_size=32",
    "data.seq_len=3",
    "model.temporal=lstm",
    "model.norm=group",
]


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
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
    }
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
    cfg = load_config(
        None,
        TINY
        + ["model.gan=true", "loss.adv_weight=0.1", "model.disc_layers=2", "model.disc_channels=4"],
    )
    model, disc = build_models(cfg)
    loss_fn = build_loss(cfg.loss, gan=True)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    d0 = [p.detach().clone() for p in disc.parameters()]
    g0 = [p.detach().clone() for p in model.parameters()]
    out = gan_step(
        model,
        disc,
        _batch(),
        loss_fn,
        opt_g,
        opt_d,
        d_loss_fn=partial(gan_d_loss, cfg.loss.gan_mode),
        grad_clip=1.0,
    )
    assert {"d_loss", "g_loss", "adv", "loss", "dice", "bce"} <= set(out)
    assert out["g_loss"] == out["adv"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(d0, disc.parameters(), strict=False))
    assert any(not torch.equal(a, b) for a, b in zip(g0, model.parameters(), strict=False))
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again


GAN = TINY + [
    "model.gan=true",
    "loss.adv_weight=0.1",
    "model.disc_layers=2",
    "model.disc_channels=4",
]


def _gan_parts(extra=(), *, lr_g=1e-3, lr_d=1e-3):
    cfg = load_config(None, GAN + list(extra))
    model, disc = build_models(cfg)
    return (
        cfg,
        model,
        disc,
        build_loss(cfg.loss, gan=True),
        torch.optim.Adam(model.parameters(), lr=lr_g),
        torch.optim.Adam(disc.parameters(), lr=lr_d, betas=(0.5, 0.999)),
        partial(gan_d_loss, cfg.loss.gan_mode),
    )


class _Recorder(nn.Module):
    """Wraps a discriminator and records what each call sees. No ``.module`` attribute, so
    `gan_step` calls it (not the inner one) in the segmenter's pass too."""

    def __init__(self, disc: nn.Module) -> None:
        super().__init__()
        self.inner = disc
        self.calls: list[dict] = []

    def forward(self, window, mask):
        self.calls.append(
            {"mask": mask.detach().clone(), "training": self.training, "grad": mask.requires_grad}
        )
        return self.inner(window, mask)


def test_gan_step_judges_real_and_fake_in_separate_passes():
    _, model, disc, loss_fn, opt_g, opt_d, d_loss_fn = _gan_parts()
    rec = _Recorder(disc).train()
    batch = _batch()
    torch.manual_seed(0)
    gan_step(model, rec, batch, loss_fn, opt_g, opt_d, d_loss_fn=d_loss_fn)
    real, fake_d, fake_g = rec.calls
    target = batch["target"]
    # D's update: a real-only forward (softened targets, never exactly 0/1), then a
    # fake-only one (detached predictions); no mixed batch
    assert real["mask"].shape == fake_d["mask"].shape == target.shape
    assert float((real["mask"] - target).abs().max()) <= 0.1
    assert not ((real["mask"] == 0) | (real["mask"] == 1)).all()
    assert not real["grad"] and not fake_d["grad"]
    # the segmenter's update: the same predictions, the same mode, gradient to the segmenter
    assert torch.equal(fake_g["mask"], fake_d["mask"]) and fake_g["grad"]
    assert real["training"] and fake_d["training"] and fake_g["training"]


@pytest.mark.parametrize("disc_norm", ["spectral", "instance"])
def test_gan_step_teaches_the_discriminator_to_separate_real_from_fake(disc_norm):
    # lr_g = 0: the segmenter's predictions stay what D was judged on before. One Adam step
    # moves every weight by about lr, so both outputs shift together; what D learnt is the
    # margin between them. vanilla: the real and fake terms pull equally at the start (lsgan
    # first lifts both towards its mean target 0.5 and separates a few steps later).
    _, model, disc, loss_fn, opt_g, opt_d, d_loss_fn = _gan_parts(
        [f"model.disc_norm={disc_norm}", "loss.gan_mode=vanilla"], lr_g=0.0, lr_d=1e-3
    )
    batch = _batch()
    image, target = batch["image"], batch["target"]
    with torch.no_grad():
        fake = torch.sigmoid(model(image)["logits"])

    def margin() -> float:  # mean D logit on real pairs minus on fake pairs
        disc.eval()  # no power-iteration update while measuring
        with torch.no_grad():
            out = float(disc(image, target).mean() - disc(image, fake).mean())
        disc.train()
        return out

    before = margin()
    torch.manual_seed(0)
    out = gan_step(model, disc, batch, loss_fn, opt_g, opt_d, d_loss_fn=d_loss_fn)
    after = margin()
    assert after > before and after > 0, (before, after)
    assert out["d_loss"] > 0


def test_segmenter_update_leaves_the_discriminator_alone():
    _, model, disc, loss_fn, opt_g, opt_d, d_loss_fn = _gan_parts()
    after_d: dict[str, list[torch.Tensor]] = {}

    def snapshot(opt, args, kwargs):  # right after D's own step, before the segmenter's
        after_d["params"] = [p.detach().clone() for p in disc.parameters()]
        after_d["grads"] = [p.grad.clone() for p in disc.parameters()]

    opt_d.register_step_post_hook(snapshot)
    g0 = [p.detach().clone() for p in model.parameters()]
    out = gan_step(model, disc, _batch(), loss_fn, opt_g, opt_d, d_loss_fn=d_loss_fn)
    moved = zip(g0, model.parameters(), strict=True)
    assert out["adv"] > 0 and any(not torch.equal(a, b) for a, b in moved)
    assert all(
        torch.equal(a, p) for a, p in zip(after_d["params"], disc.parameters(), strict=False)
    )
    assert all(
        torch.equal(a, p.grad) for a, p in zip(after_d["grads"], disc.parameters(), strict=False)
    )


@pytest.mark.parametrize("disc_norm", DISC_NORMS)
def test_discriminator_norms(disc_norm):
    default = load_config(None, GAN).model.disc_norm
    _, disc = build_models(load_config(None, GAN + [f"model.disc_norm={disc_norm}"]))
    kinds = {type(m) for m in disc.modules()}
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert (nn.BatchNorm2d in kinds) == (disc_norm == "batch")
    assert (nn.InstanceNorm2d in kinds) == (disc_norm == "instance")
    assert all(parametrize.is_parametrized(c, "weight") == (disc_norm == "spectral") for c in convs)
    if disc_norm == default:
        assert nn.BatchNorm2d not in kinds  # the default is batch-independent
    # 2 stride-2 layers, then two 4x4 stride-1 convs: 32 / 4 - 2
    assert disc(torch.randn(2, 3, 32, 32), torch.rand(2, 1, 32, 32)).shape == (2, 1, 6, 6)


def test_discriminator_norm_is_validated():
    assert load_config(None, GAN).model.disc_norm == "spectral"
    with pytest.raises(
        UserError, match="model.disc_norm must be one of spectral, instance, batch, got 'layer'"
    ):
        load_config(None, GAN + ["model.disc_norm=layer"])
    with pytest.raises(ValueError, match="spectral, instance, batch"):
        PatchDiscriminator(seq_len=3, norm="group")


def test_gan_start_defaults_to_half_the_run():
    assert TrainConfig().gan_start_epoch == -1
    assert TrainConfig(epochs=10).gan_start() == 5  # GAN in epochs 6..10
    assert TrainConfig(epochs=7).gan_start() == 3
    assert TrainConfig(epochs=1).gan_start() == 0
    assert TrainConfig(epochs=10, gan_start_epoch=0).gan_start() == 0  # adversarial throughout
    assert TrainConfig(epochs=10, gan_start_epoch=8).gan_start() == 8
    assert load_config(None, ["train.gan_start_epoch=0"]).train.gan_start() == 0
    with pytest.raises(UserError, match="train.gan_start_epoch must be >= 0, or -1"):
        load_config(None, ["train.gan_start_epoch=-2"])


def test_gan_step_with_a_ddp_discriminator(tmp_path):
    """Two forwards of a DDP-wrapped D feed one backward: no 'marked ready twice' error, no
    need for find_unused_parameters (world size 1 runs DDP's reducer all the same)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _, model, disc, loss_fn, opt_g, _, d_loss_fn = _gan_parts()
        ddp = DistributedDataParallel(disc)
        opt_d = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        d0 = [p.detach().clone() for p in disc.parameters()]
        for _ in range(2):
            out = gan_step(model, ddp, _batch(), loss_fn, opt_g, opt_d, d_loss_fn=d_loss_fn)
        assert math.isfinite(out["d_loss"]) and out["adv"] > 0
        assert all(not torch.equal(a, b) for a, b in zip(d0, disc.parameters(), strict=False))
        assert all(p.requires_grad for p in disc.parameters())
    finally:
        dist.destroy_process_group()


def test_seg_step_leaves_discriminator_alone():
    cfg = load_config(
        None,
        TINY
        + ["model.gan=true", "loss.adv_weight=0.1", "model.disc_layers=2", "model.disc_channels=4"],
    )
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
    halves = eval_step(model, {k: v[:3] for k, v in batch.items()}) + eval_step(
        model, {k: v[3:] for k, v in batch.items()}
    )
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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(warmup_cosine, warmup_steps=2, total_steps=10)
    )
    seg_step(model, _batch(), build_loss(cfg.loss), opt)
    sched.step()
    torch.save(
        {
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        },
        tmp_path / "s.pt",
    )
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert optimizer_digest(back["opt"]) == optimizer_digest(opt.state_dict()) > 0
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])
    assert optimizer_digest(opt2.state_dict()) == optimizer_digest(opt.state_dict())
