"""ResNet18/34 in pure torch with torchvision's ``state_dict`` key names.

torchvision is not a dependency, yet its weights are the usual pretrained encoder. The
modules here are named exactly as in ``torchvision.models.resnet`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so a file written with
``torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)`` loads with
`load_resnet_weights`. Nothing downloads: weights come from a local path or not at all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vfsearch.core.errors import UserError

# Blocks per stage, as torchvision.
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
STAGE_CHANNELS: tuple[int, int, int, int] = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``(N, in_ch, H, W) -> (N, out_ch, H/stride, W/stride)``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        activated: torch.Tensor = self.relu(out + identity)
        return activated


def make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_resnet(module: nn.Module) -> None:
    """torchvision's random initialisation (Kaiming normal for convs, unit BN)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def read_state_dict(
    path: str | Path, *, option: str = "model.encoder_weights"
) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` file with ``torch.load(weights_only=True)`` (no code unpickled).

    A dict wrapping the weights under ``state_dict`` or ``model`` is unwrapped, and a
    ``module.`` prefix (DDP) stripped. Missing or unreadable files raise `UserError`.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option}: weights file {str(p)!r} not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(
            f"{option}: cannot read weights file {str(p)!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{option}: {str(p)!r} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_resnet_weights(
    module: nn.Module, path: str | Path, *, arch: str, option: str = "model.encoder_weights"
) -> None:
    """Copy torchvision ResNet weights from ``path`` into the matching keys of ``module``.

    ``module`` owns torchvision-named children (``conv1``, ``bn1``, ``layer1``...); keys it
    lacks (``fc``, stages a shallow encoder does not build) are skipped. ``conv1`` weights are
    adapted to the module's ``k`` input channels (CT slices, never RGB): averaged over the
    file's RGB, then repeated ``k`` times and divided by ``k``, so ``k`` equal slices give the
    response the RGB filter gives the same grey image. Every key of ``module`` that the file should
    provide must be present with the right shape, else `UserError` (e.g. a ResNet34 file for
    a ResNet18 encoder).
    """
    src = read_state_dict(path, option=option)
    own = module.state_dict()
    tv_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
    wanted = [k for k in own if k.startswith(tv_prefixes)]
    missing = [k for k in wanted if k not in src]
    if missing:
        raise UserError(
            f"{option}: {str(path)!r} is not a torchvision {arch} state_dict "
            f"(missing {len(missing)} keys, e.g. {missing[0]!r})"
        )
    # A ResNet34 file holds every ResNet18 key with the same shapes: compare block counts.
    for s in range(1, 5):
        own_blocks = {k.split(".")[1] for k in own if k.startswith(f"layer{s}.")}
        src_blocks = {k.split(".")[1] for k in src if k.startswith(f"layer{s}.")}
        if own_blocks and own_blocks != src_blocks:
            raise UserError(
                f"{option}: {str(path)!r} is not a torchvision {arch} state_dict "
                f"(layer{s} has {len(src_blocks)} blocks, {arch} has "
                f"{len(own_blocks)})"
            )
    new: dict[str, torch.Tensor] = {}
    for k in wanted:
        value = src[k]
        if k == "conv1.weight" and value.ndim == 4:
            # Our inputs are CT slices, never RGB, even when there happen to be 3 of them.
            k_in = own[k].shape[1]
            value = value.mean(dim=1, keepdim=True).repeat(1, k_in, 1, 1) / k_in
        if value.shape != own[k].shape:
            raise UserError(
                f"{option}: {str(path)!r} does not fit {arch}: {k} has shape "
                f"{tuple(value.shape)}, expected {tuple(own[k].shape)}"
            )
        new[k] = value.to(own[k].dtype)
    module.load_state_dict(new, strict=False)
