"""Contract tests over every registered model variant, the seams, and pretrained loading."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vfsearch.core.config import ModelConfig
from vfsearch.core.errors import UserError
from vfsearch.core.losses import gan_d_loss, gan_g_loss
from vfsearch.core.models import build_discriminator, build_model, list_models
from vfsearch.core.models.temporal import HIDDEN_CAP, TEMPORALS

torch.set_num_threads(1)
T, H = 3, 32  # window length and side of the contract tests
SMALL = ModelConfig(depth=3, base_channels=4)

# Every registered family opts in with one or more variants (timm/smp contract-suite style).
VARIANTS: dict[str, dict[str, dict]] = {
    "attention_unet": {
        "lstm": {},
        "lstm_unidirectional": {"bidirectional": False, "temporal_hidden": 8},
        "lstm_pooled": {"temporal": "lstm_pooled"},
        "convlstm": {"temporal": "convlstm"},
        "convlstm_unidirectional_group": {
            "temporal": "convlstm",
            "bidirectional": False,
            "norm": "group",
            "dropout": 0.2,
        },
        "none": {"temporal": "none"},
        "no_attention_instance": {"attention": False, "norm": "instance"},
        "all_slices": {"predict_all_slices": True},
        "all_slices_none": {"predict_all_slices": True, "temporal": "none"},
        "depth5": {"depth": 5},
        "resnet18_depth5": {
            "encoder": "resnet18",
            "depth": 5,
            "temporal": "convlstm",
            "temporal_hidden": 16,
        },
        "resnet34": {"encoder": "resnet34", "norm": "group"},
    },
    "resnet18_classifier": {"classifier": {"dropout": 0.1}},
}
CASES = [
    pytest.param(fam, replace(SMALL, family=fam, **kw), id=f"{fam}-{name}")
    for fam, variants in VARIANTS.items()
    for name, kw in variants.items()
]


def window(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, T, H, H, generator=torch.Generator().manual_seed(seed))


def built(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, T)


def test_every_registered_family_is_covered():
    assert set(list_models()) == set(VARIANTS)
    assert {"attention_unet", "resnet18_classifier"} <= set(list_models())


def test_every_temporal_module_is_covered_and_accepted_by_the_config():
    from vfsearch.core.config import _CHOICES

    assert _CHOICES["model.temporal"] == TEMPORALS  # config must not import torch: kept in sync
    covered = {p.values[1].temporal for p in CASES if p.values[0] == "attention_unet"}
    assert covered == set(TEMPORALS)


@pytest.mark.parametrize("family, cfg", CASES)
def test_contract(family, cfg):
    model = built(cfg).train()
    x = window()
    out = model(x)
    logits = out["logits"]
    if model.output_kind == "classification":
        assert logits.shape == (2, 1) and out["attention"] == []
    else:
        assert logits.shape == ((2, T, H, H) if cfg.predict_all_slices else (2, 1, H, H))
        if cfg.attention:
            assert len(out["attention"]) == cfg.depth
            for level, alpha in enumerate(out["attention"]):
                side = H // 2**level
                assert alpha.shape == (2, 1, side, side)
                assert alpha.min() >= 0 and alpha.max() <= 1
        else:
            assert out["attention"] == []
    assert torch.isfinite(logits).all()
    # every parameter receives a non-zero, finite gradient (a bypassed module would not)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weight).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    # deterministic under a seed: same init, same dropout masks, same output
    a, b = built(cfg).state_dict(), built(cfg).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(7)
    first = built(cfg).train()(x)["logits"]
    torch.manual_seed(7)
    second = built(cfg).train()(x)["logits"]
    assert torch.equal(first, second)


@pytest.mark.parametrize("all_slices", [False, True])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_discriminator_trains_and_passes_gradient_to_the_segmenter(all_slices, norm):
    cfg = replace(SMALL, gan=True, predict_all_slices=all_slices, norm=norm)
    torch.manual_seed(0)
    seg, disc = build_model(cfg, T), build_discriminator(cfg, T)
    x = window()
    real_mask = (torch.rand(2, T if all_slices else 1, H, H) > 0.9).float()
    fake_mask = torch.sigmoid(seg(x)["logits"])
    real, fake = disc(x, real_mask), disc(x, fake_mask.detach())
    assert real.shape == (2, 1, H // 8 - 2, H // 8 - 2)  # 3 stride-2 layers, then 2 k4 convs
    gan_d_loss("lsgan", real, fake).backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"disc {name} did not train"
    disc.zero_grad()
    gan_g_loss("lsgan", disc(x, fake_mask)).backward()
    for name, p in seg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"segmenter {name}: no adv grad"
    with pytest.raises(ValueError, match="mask"):
        disc(x, torch.zeros(2, 2, H, H))


def output_change(cfg: ModelConfig, slice_index: int) -> float:
    """Largest change of the (centre) logits when one slice of the window is replaced."""
    # GroupNorm: per-sample statistics never couple the slices, and unlike BatchNorm in eval
    # mode at initialisation it does not attenuate the signal towards float rounding.
    model = built(replace(cfg, norm="group")).eval()
    x = window(seed=3)
    y = x.clone()
    y[:, slice_index] = torch.randn(2, H, H, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return (model(x)["logits"] - model(y)["logits"]).abs().max().item()


@pytest.mark.parametrize("temporal", ["lstm", "lstm_pooled", "convlstm"])
def test_temporal_modules_read_the_other_slices(temporal):
    bi = replace(SMALL, temporal=temporal, bidirectional=True)
    uni = replace(bi, bidirectional=False)
    assert output_change(bi, 0) > 1e-4 and output_change(bi, T - 1) > 1e-4
    # unidirectional: the centre position has read the slices before it, not after it
    assert output_change(uni, 0) > 1e-4
    assert output_change(uni, T - 1) == 0.0


# Chebyshev radius around a perturbed position of slice c-1 within which the centre output
# may change: the per-position LSTM touches that position only, the bidirectional ConvLSTM
# two 3x3 convs (step c-1, then step c), the pooled LSTM every position (None).
REACH = {"lstm": 0, "convlstm": 2, "lstm_pooled": None}


@pytest.mark.parametrize("temporal", sorted(REACH))
def test_neighbour_detail_reaches_the_centre_at_the_same_position(temporal):
    model = built(replace(SMALL, temporal=temporal)).eval()
    c, side, (i, j) = model.encoder.bottleneck_channels, 8, (2, 3)
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, T, c, side, side, generator=g)  # (B, T, C, h, w)
    moved = feats.clone()
    moved[0, T // 2 - 1, :, i, j] += torch.randn(c, generator=g)  # one position of slice c-1
    with torch.no_grad():
        change = (model.temporal(moved) - model.temporal(feats))[:, T // 2]  # (B, C, h, w)
    change = change.abs().amax(dim=1)  # (B, h, w)
    assert change[0, i, j] > 1e-3  # the neighbour's detail reaches the same position
    assert change[1].max() == 0.0  # and no other window
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    far = torch.maximum((rows - i).abs(), (cols - j).abs()) > (REACH[temporal] or 0)
    if REACH[temporal] is None:  # pooled: a global scale and shift, felt everywhere
        assert change[0][far].min() > 1e-5
    else:
        assert change[0][far].max() <= 1e-6 * change[0, i, j]


def lstm_params(c: int, hidden: int, dirs: int) -> int:
    """``nn.LSTM(c, hidden)``: 4 gates x (W_ih, W_hh, b_ih, b_hh) per direction."""
    return dirs * 4 * hidden * (c + hidden + 2)


def convlstm_params(c: int, hidden: int, dirs: int) -> int:
    """One 3x3 conv ``c + hidden -> 4 * hidden`` per direction, then a 1x1 conv to ``c``."""
    return dirs * 4 * hidden * ((c + hidden) * 9 + 1) + (dirs * hidden + 1) * c


def test_default_temporal_hidden_width_is_capped():
    big = ModelConfig(depth=5, base_channels=32)  # bottleneck C = 32 * 2**5 = 1024
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        none, conv, lstm, conv16 = (
            build_model(replace(big, **kw), T)
            for kw in (
                {"temporal": "none"},
                {"temporal": "convlstm"},
                {"temporal": "lstm"},
                {"temporal": "convlstm", "temporal_hidden": 16},
            )
        )

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    c = conv.encoder.bottleneck_channels
    assert c == 1024 and c > HIDDEN_CAP
    assert convlstm_params(c, c, 2) > 150e6  # the uncapped default: most of the model
    assert count(conv) <= count(none) + convlstm_params(c, HIDDEN_CAP, 2) < 40e6
    assert count(conv.temporal_module) == convlstm_params(c, HIDDEN_CAP, 2)
    assert count(lstm.temporal_module) == lstm_params(c, HIDDEN_CAP, 2) + (2 * HIDDEN_CAP + 1) * c
    assert count(conv16.temporal_module) == convlstm_params(c, 16, 2)  # explicit width wins
    # below the cap the default is the bottleneck width
    small = built(SMALL)
    assert small.temporal_module.lstm.hidden_size == small.encoder.bottleneck_channels < HIDDEN_CAP


def test_no_temporal_reads_only_the_centre_slice():
    cfg = replace(SMALL, temporal="none")
    assert output_change(cfg, 0) == 0.0 and output_change(cfg, T - 1) == 0.0
    assert output_change(cfg, T // 2) > 1e-4


@pytest.mark.parametrize("temporal", ["lstm", "lstm_pooled", "none"])
def test_forward_features_on_separately_encoded_slices(temporal):
    """Fusion's seam: encode every slice of a stack once, assemble windows, decode."""
    model = built(replace(SMALL, temporal=temporal)).eval()
    stack = torch.randn(6, 1, H, H, generator=torch.Generator().manual_seed(4))  # 6 slices
    with torch.no_grad():
        bottleneck, skips = model.encode(stack)  # (6, C, h, w), [(6, C_l, H_l, W_l)]
        for start in range(6 - T + 1):  # windows [start, start + T)
            centre = start + T // 2
            out = model.forward_features(
                bottleneck[start : start + T][None], [s[centre : centre + 1] for s in skips]
            )
            ref = model(stack[start : start + T, 0][None])
            assert torch.allclose(out["logits"], ref["logits"], atol=1e-5)
            assert all(
                torch.allclose(a, b, atol=1e-6)
                for a, b in zip(out["attention"], ref["attention"], strict=True)
            )


def test_all_slice_prediction_decodes_every_position_with_its_own_skips():
    model = built(replace(SMALL, predict_all_slices=True, temporal="none")).eval()
    x = window()
    with torch.no_grad():
        out = model(x)["logits"]  # (B, T, H, W)
        for t in range(T):
            single, _ = model.decode(*model.encode(x[:, t : t + 1]))  # (B, 1, H, W)
            assert torch.allclose(out[:, t : t + 1], single, atol=1e-5)


def test_unknown_family_and_bad_inputs():
    with pytest.raises(UserError, match="attention_unet, resnet18_classifier"):
        build_model(replace(SMALL, family="vnet"), T)
    with pytest.raises(UserError, match="model.temporal must be one of"):
        build_model(replace(SMALL, temporal="gru"), T)
    with pytest.raises(UserError, match="encoder_weights"):
        build_model(replace(SMALL, encoder_weights="/x.pt"), T)
    with pytest.raises(UserError, match="resnet18_classifier"):
        build_model(replace(SMALL, family="resnet18_classifier", gan=True), T)
    model = build_model(SMALL, T)
    assert model.model_cfg == SMALL and model.seq_len == T
    with pytest.raises(ValueError, match="expected a window"):
        model(torch.zeros(2, T + 2, H, H))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(2, T, 36, 36))


# -- pretrained ResNet weights -------------------------------------------------------------


def torchvision_resnet_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """What ``torchvision.models.<arch>().state_dict()`` holds (names and shapes), written
    out independently of vfsearch so the test checks compatibility, not self-consistency."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        sd[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.bias"] = torch.randn(c, generator=g)
        sd[f"{prefix}.running_mean"] = torch.randn(c, generator=g)
        sd[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(100)

    sd["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g) * 0.05
    bn("bn1", 64)
    blocks = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}[arch]
    in_ch = 64
    for s, (n, c) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), 1):
        for i in range(n):
            p = f"layer{s}.{i}"
            sd[f"{p}.conv1.weight"] = (
                torch.randn(c, in_ch if i == 0 else c, 3, 3, generator=g) * 0.05
            )
            bn(f"{p}.bn1", c)
            sd[f"{p}.conv2.weight"] = torch.randn(c, c, 3, 3, generator=g) * 0.05
            bn(f"{p}.bn2", c)
            if i == 0 and s > 1:
                sd[f"{p}.downsample.0.weight"] = torch.randn(c, in_ch, 1, 1, generator=g) * 0.05
                bn(f"{p}.downsample.1", c)
        in_ch = c
    sd["fc.weight"] = torch.randn(1000, 512, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def test_reference_state_dict_has_torchvision_key_counts():
    # torchvision: len(resnet18().state_dict()) == 122, resnet34: 218
    assert len(torchvision_resnet_state_dict("resnet18")) == 122
    assert len(torchvision_resnet_state_dict("resnet34")) == 218


@pytest.mark.parametrize("arch, depth", [("resnet18", 3), ("resnet34", 5)])
def test_segmenter_loads_torchvision_weights_from_a_local_file(tmp_path, arch, depth):
    sd = torchvision_resnet_state_dict(arch)
    path = tmp_path / f"{arch}.pth"
    torch.save(sd, path)
    cfg = replace(SMALL, encoder=arch, depth=depth, encoder_weights=str(path))
    model = build_model(cfg, T)
    enc = model.encoder.state_dict()
    assert torch.allclose(enc["conv1.weight"], sd["conv1.weight"].mean(1, keepdim=True))
    for key in (
        "layer1.0.conv1.weight",
        "layer1.1.bn2.running_var",
        "bn1.bias",
        "layer2.0.downsample.0.weight",
    ):
        assert torch.equal(enc[key], sd[key]), key
    deepest = f"layer{depth - 1}.0.conv2.weight"
    assert torch.equal(enc[deepest], sd[deepest])
    assert f"layer{depth}.0.conv1.weight" not in enc  # stages past the bottleneck not built
    # random init by default, and a different file gives different weights
    assert not torch.equal(
        build_model(replace(cfg, encoder_weights=""), T).encoder.state_dict()[
            "layer1.0.conv1.weight"
        ],
        sd["layer1.0.conv1.weight"],
    )


def test_classifier_loads_weights_with_conv1_spread_over_the_window(tmp_path):
    sd = torchvision_resnet_state_dict("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": sd}, path)  # wrapped checkpoints are unwrapped
    model = build_model(replace(SMALL, family="resnet18_classifier", encoder_weights=str(path)), T)
    msd = model.state_dict()
    expected = sd["conv1.weight"].mean(1, keepdim=True).repeat(1, T, 1, 1) / T
    assert torch.allclose(msd["conv1.weight"], expected)
    assert torch.equal(msd["layer4.1.bn2.weight"], sd["layer4.1.bn2.weight"])
    assert msd["fc.weight"].shape == (1, 512)


def test_bad_weight_files_are_user_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth"):
        build_model(replace(SMALL, encoder="resnet18", encoder_weights=str(missing)), T)
    r34 = tmp_path / "r34.pth"
    torch.save(torchvision_resnet_state_dict("resnet34"), r34)
    with pytest.raises(UserError, match="layer1 has 3 blocks"):
        build_model(replace(SMALL, encoder="resnet18", encoder_weights=str(r34)), T)
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision_resnet_state_dict("resnet18"), r18)
    with pytest.raises(UserError, match="missing"):
        build_model(replace(SMALL, encoder="resnet34", encoder_weights=str(r18)), T)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a tensor file")
    with pytest.raises(UserError, match="cannot read"):
        build_model(replace(SMALL, encoder="resnet18", encoder_weights=str(junk)), T)


# -- overfit on phantom windows ------------------------------------------------------------


def phantom_windows(
    n: int = 6, side: int = 32, seq_len: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sagittal windows ``(n, seq_len, side, side)`` centred on fractured slices of one small
    phantom case, HU normalised as ``(hu - 100) / 300`` clipped to [-3, 5], and the centre
    slice's fracture mask ``(n, 1, side, side)``. Each patch is centred on the fracture."""
    import numpy as np

    from vfsearch.core.phantom import make_case

    case = make_case(0, small=True)
    frac = case.fracture  # (z, y, x); a sagittal slice is a (z, y) image at fixed x
    img = np.clip((case.ct.astype(np.float32) - 100.0) / 300.0, -3.0, 5.0)
    xs = np.unique(np.nonzero(frac)[2])
    xs = xs[(xs >= seq_len // 2) & (xs < frac.shape[2] - seq_len // 2)]
    centres = xs[np.linspace(0, len(xs) - 1, n).round().astype(int)]
    windows, masks = [], []
    for x in centres:
        zz, yy = np.nonzero(frac[:, :, x])
        z0 = int(np.clip(zz.mean() - side // 2, 0, frac.shape[0] - side))
        y0 = int(np.clip(yy.mean() - side // 2, 0, frac.shape[1] - side))
        patch = img[z0 : z0 + side, y0 : y0 + side, x - seq_len // 2 : x + seq_len // 2 + 1]
        windows.append(np.moveaxis(patch, -1, 0))  # (T, side, side)
        masks.append(frac[z0 : z0 + side, y0 : y0 + side, x][None].astype(np.float32))
    return torch.from_numpy(np.stack(windows)), torch.from_numpy(np.stack(masks))


@pytest.mark.slow
def test_overfits_a_small_batch_of_phantom_windows():
    from vfsearch.core.config import LossConfig
    from vfsearch.core.losses import build_loss

    x, y = phantom_windows()
    assert y.sum() > 0 and x.shape == (6, 5, 32, 32)
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=3, base_channels=8, temporal="lstm"), 5)
    loss_fn = build_loss(LossConfig())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def hard_dice() -> float:
        model.eval()
        with torch.no_grad():
            pred = (model(x)["logits"] > 0).float()
        model.train()
        return (2 * (pred * y).sum() / (pred.sum() + y.sum())).item()

    assert hard_dice() < 0.5  # not solved at initialisation
    first, dice = None, 0.0
    for step in range(1, 151):
        total, _ = loss_fn(model(x)["logits"], y)
        opt.zero_grad()
        total.backward()
        opt.step()
        first = first if first is not None else total.item()
        if step % 10 == 0:
            dice = hard_dice()
            if dice > 0.9:
                break
    assert dice > 0.9, f"Dice {dice:.3f} after {step} steps"
    assert total.item() < first


def test_rebuild_from_flat_config_and_state_dict(tmp_path):
    """The export path: flat params + state_dict rebuild the model, no pickled code; the
    pretrained file need not exist any more (load_weights=False)."""
    from vfsearch.core.config import Config

    weights = tmp_path / "r18.pth"
    torch.save(torchvision_resnet_state_dict("resnet18"), weights)
    cfg = Config(
        model=replace(SMALL, encoder="resnet18", encoder_weights=str(weights), temporal="convlstm")
    )
    model = build_model(cfg.model, T).eval()
    state = model.state_dict()
    flat = cfg.flatten()
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    weights.unlink()
    rebuilt_cfg = Config.from_flat({k: str(v) for k, v in flat.items()})  # as MLflow returns
    assert rebuilt_cfg == cfg
    rebuilt = build_model(rebuilt_cfg.model, T, load_weights=False).eval()
    rebuilt.load_state_dict(state)
    assert rebuilt.model_cfg == cfg.model
    x = window()
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], rebuilt(x)["logits"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.predict_all_slices=true"], "data.target_all_slices must be equal"),
        (
            [
                "model.family=resnet18_classifier",
                "model.predict_all_slices=true",
                "data.target_all_slices=true",
            ],
            "must be false",
        ),
        (["model.norm=instance", "model.depth=5", "data.patch_size=32"], "at least 2x2"),
        (
            [
                "model.gan=true",
                "loss.adv_weight=0.1",
                "model.disc_layers=4",
                "data.patch_size=32",
                "model.depth=3",
            ],
            "too small for model.disc_layers=4",
        ),
        (["model.dropout=1.0"], "model.dropout must be >= 0 and < 1"),
    ],
)
def test_model_config_combinations_fail_at_load(overrides, needle):
    from vfsearch.core.config import load_config

    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        load_config(None, overrides)
