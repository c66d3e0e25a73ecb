"""The one configuration object of a vfsearch run.

`Config` is a frozen dataclass tree (``model``, ``loss``, ``data``, ``train``). The same tree
is flattened into dotted keys (``model.temporal``, ``loss.dice_weight``) for Ray Tune's
search space, MLflow params and the export bundle, and rebuilt from them with
`Config.from_flat`. Pure Python: no torch, no yaml at import time.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from vfsearch.core.errors import UserError

Plane = Literal["axial", "sagittal", "coronal"]
PLANES: tuple[str, ...] = ("axial", "sagittal", "coronal")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the segmenter (or the baseline classifier); see `vfsearch.core.models`.

    ``family`` picks a builder from `vfsearch.core.models.list_models()`. ``depth`` counts encoder
    levels (3-5) with ``base_channels`` doubling per level. ``temporal`` is the module over
    the bottleneck features of the window (``lstm`` per spatial position, ``lstm_pooled``,
    ``convlstm`` or ``none``: centre slice only). A unidirectional temporal module reads its
    output at the centre slice, so it sees only the slices before it: ``bidirectional``
    (default) sees both sides. ``gan`` adds a conditional PatchGAN discriminator (``disc_*``)
    and needs ``loss.adv_weight > 0``.
    """

    family: str = "attention_unet"
    depth: int = 4
    base_channels: int = 16
    norm: str = "batch"  # batch | instance | group
    dropout: float = 0.0  # Dropout2d inside every conv block, 0 <= p < 1
    attention: bool = True  # additive attention gates on the skips (false: ablation)
    temporal: str = "lstm"  # lstm | lstm_pooled | convlstm | none
    bidirectional: bool = True
    temporal_hidden: int = 0  # 0: min(bottleneck width, 64), see vfsearch.core.models.temporal
    predict_all_slices: bool = False  # masks of all T slices; must equal data.target_all_slices
    encoder: str = "unet"  # unet | resnet18 | resnet34
    encoder_weights: str = ""  # local torchvision state_dict file; "" = random init
    gan: bool = False
    disc_channels: int = 32
    disc_layers: int = 3
    disc_norm: str = "spectral"  # spectral | instance | batch (discriminator only)


@dataclass(frozen=True)
class LossConfig:
    """Weights and options of the training loss: Dice + BCE (+ focal/Tversky) (+ adversarial).

    ``total = dice_weight*Dice + bce_weight*BCE + extra_weight*extra + adv_weight*adv``.
    ``batch_dice`` sums Dice counts over the whole batch (stable for sparse masks, where many
    samples have no foreground). ``pos_weight`` scales the BCE of foreground pixels.
    ``extra`` adds a focal (``focal_gamma``) or Tversky (``tversky_alpha`` weighs false
    positives, ``tversky_beta`` false negatives) term for tiny regions. See `vfsearch.core.losses`.
    """

    dice_weight: float = 1.0
    bce_weight: float = 1.0
    adv_weight: float = 0.0
    batch_dice: bool = True
    pos_weight: float = 1.0
    extra: str = "none"  # none | focal | tversky
    extra_weight: float = 0.0
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    gan_mode: str = "lsgan"  # vanilla | lsgan | hinge


@dataclass(frozen=True)
class DataConfig:
    """How 2.5D windows are cut from the store.

    ``seq_len`` odd, 3-9: slices ``[t - seq_len//2 .. t + seq_len//2]`` along ``plane``.
    ``patch_size`` is the in-plane size (pixels) every slice is padded or cropped to.
    ``augment`` is the strength (0..1; 0 = off) of rotation (±15°·s), scaling (1 ± 0.15·s),
    contrast, brightness, gamma and noise, plus a random patch position, where augmentation
    is on (training windows).
    ``oversample_fracture``: windows whose target holds fracture get sampling weight
    ``1 + oversample_fracture`` (others 1). ``target_all_slices``: the target is the fracture
    mask of every slice of the window, (T, H, W), instead of slice t only, (1, H, W).
    ``balance_domains``: every case ``domain`` of the training split (a manifest column, e.g.
    ``phantom`` and ``real``) gets the same share of the drawn training windows, so a few
    real scans are not drowned by many phantoms; off, windows are drawn in proportion.
    See `vfsearch.adapters.dataset.WindowDataset`.
    """

    seq_len: int = 5
    plane: str = "sagittal"
    patch_size: int = 128
    augment: float = 0.5  # augmentation strength 0 (off) .. 1
    oversample_fracture: float = 2.0  # extra sampling weight for windows with fracture; at 0
    #                                   a model on real-background data learned nothing in 8
    #                                   epochs (benchmarks/quality.py --real-train), at 2 it did
    target_all_slices: bool = False
    balance_domains: bool = False
    open_vertebrae: int = 32  # vertebrae the epoch order draws from at a time: batches mix
    #                           about as well as a global shuffle, and 32 crops fit the cache
    augment_device: str = "auto"  # cpu: per window in the loader; device: batched on the
    #                    training device (vfsearch.core.augment); auto: device on CUDA, else cpu


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule of one training run.

    With ``model.gan`` the segmenter trains on the segmentation losses alone for the first
    `gan_start` epochs, then adversarially (pix2pix-style fine-tuning from a sensible
    segmenter). ``gan_start_epoch`` -1 (default) means half the run, ``epochs // 2``; 0 means
    adversarial from the first epoch. An ASHA rung placed before the GAN starts judges a
    trial as a plain segmenter: place the grace period after it.
    """

    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup_epochs: int = 1
    grad_clip: float = 1.0
    gan_start_epoch: int = -1  # segmentation-only epochs before the GAN; -1: epochs // 2
    disc_lr: float = 2e-4
    early_stop_patience: int = 0  # 0: off
    seed: int = 0
    num_workers: int = -1  # DataLoader processes per training worker; -1: auto (0 on CPU,
    #                        CPUs per worker - 1, at most 8, on GPU)
    max_windows_per_epoch: int = 0  # 0: all
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    val_threshold: float = 0.5  # probability above which a validation pixel is positive
    val_windows: int = -1  # per-epoch validation windows, evenly strided over every
    #                        vertebra: 0 all; N about N; -1 auto: about as many as the
    #                        epoch's training windows when max_windows_per_epoch caps the
    #                        epoch, else all. val_dice3d (the sweep metric) scores every slice
    max_failures: int = 3  # worker failures Ray Train recovers from (from the last checkpoint)
    keep_checkpoints: int = 2  # most recent epoch checkpoints kept (each holds the best model)
    final_eval: bool = True  # end with the fused 3D validation (val_dice3d), the sweep metric
    log_pictures: bool = True  # log heatmaps/attention/3D pictures of the best model to MLflow

    def gan_start(self) -> int:
        """The number of segmentation-only epochs: the GAN trains in (1-based) epochs
        ``> gan_start()``. ``gan_start_epoch``, or ``epochs // 2`` where it is -1 (unset)."""
        return self.epochs // 2 if self.gan_start_epoch == -1 else self.gan_start_epoch


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def flatten(self) -> dict[str, Any]:
        """Dotted keys to plain values, e.g. ``{"model.depth": 4, ...}``."""
        return flatten(self)

    @classmethod
    def from_flat(cls, flat: dict[str, Any], *, source: str = "config") -> Config:
        """Rebuild from dotted keys; unknown keys and wrong types raise `UserError`."""
        return with_overrides(cls(), flat, source=source)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def known_keys() -> dict[str, type]:
    """Every dotted key of `Config` and the Python type of its value."""
    out: dict[str, type] = {}
    for section in fields(Config):
        hints = typing.get_type_hints(
            section.type if isinstance(section.type, type) else globals()[section.type]
        )
        for key, tp in hints.items():
            out[f"{section.name}.{key}"] = tp
    return out


def _coerce(value: Any, tp: type, key: str, source: str) -> Any:
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if tp is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{source}: {key} must be true or false, got {value!r}")
        try:
            return tp(text)
        except ValueError:
            raise UserError(f"{source}: {key} must be {tp.__name__}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key} must be true or false, got {value!r}")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise UserError(f"{source}: {key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: {key} must be a string, got {value!r}")
        return value
    return value


def with_overrides(
    config: Config, flat: dict[str, Any], *, source: str = "config", check: bool = True
) -> Config:
    """Return ``config`` with dotted-key values replaced, each coerced to the field's type.

    ``check=False`` skips the cross-field `validate` (for partial configs such as a search
    space's fixed keys, which only make sense together with the sampled ones).
    """
    keys = known_keys()
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key not in keys:
            hint = "" if "." in key else " (keys are dotted, e.g. model.depth)"
            raise UserError(f"{source}: unknown key {key!r}{hint}")
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = _coerce(value, keys[key], key, source)
    updated = {name: replace(getattr(config, name), **vals) for name, vals in sections.items()}
    merged = replace(config, **updated)
    return validate(merged, source=source) if check else merged


def parse_overrides(items: list[str], *, source: str = "--set") -> dict[str, str]:
    """Parse ``["model.depth=5", ...]`` into a dict of dotted keys to raw strings."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{source}: expected key=value, got {item!r}")
        out[key.strip()] = value
    return out


def nest(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping (as read from YAML) into dotted keys."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(nest(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a YAML file (nested or dotted keys), then ``key=value`` overrides."""
    config = Config()
    if path:
        import pathlib

        import yaml

        p = pathlib.Path(path)
        if not p.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of config keys")
        config = with_overrides(config, nest(raw), source=str(path))
    if overrides:
        config = with_overrides(config, parse_overrides(overrides), source="--set")
    return config


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.norm": ("batch", "instance", "group"),
    "model.temporal": ("lstm", "lstm_pooled", "convlstm", "none"),  # models.temporal.TEMPORALS
    "model.encoder": ("unet", "resnet18", "resnet34"),
    "model.disc_norm": ("spectral", "instance", "batch"),  # models.discriminator.DISC_NORMS
    "loss.extra": ("none", "focal", "tversky"),
    "loss.gan_mode": ("vanilla", "lsgan", "hinge"),
    "data.plane": PLANES,
    "data.augment_device": ("auto", "cpu", "device"),  # core.augment.AUGMENT_DEVICES
    "train.optimizer": ("adam", "adamw"),
}


def _check_choices(flat: dict[str, Any], prefix: str, source: str) -> None:
    for key, choices in _CHOICES.items():
        if key.startswith(prefix) and flat[key] not in choices:
            raise UserError(
                f"{source}: {key} must be one of {', '.join(choices)}, got {flat[key]!r}"
            )


def validate_model(model: ModelConfig, *, source: str = "config") -> ModelConfig:
    """Ranges of `ModelConfig` alone (`vfsearch.core.models.build_model` calls this too)."""
    flat = flatten(model, "model.")
    _check_choices(flat, "model.", source)
    if not 3 <= model.depth <= 5:
        raise UserError(f"{source}: model.depth must be 3..5, got {model.depth}")
    if model.base_channels < 1:
        raise UserError(f"{source}: model.base_channels must be >= 1, got {model.base_channels}")
    if not 0 <= model.dropout < 1:
        raise UserError(f"{source}: model.dropout must be >= 0 and < 1, got {model.dropout}")
    if model.temporal_hidden < 0:
        raise UserError(
            f"{source}: model.temporal_hidden must be >= 0 "
            f"(0: min(bottleneck width, 64)), got {model.temporal_hidden}"
        )
    if model.disc_channels < 1 or model.disc_layers < 1:
        raise UserError(f"{source}: model.disc_channels and model.disc_layers must be >= 1")
    if model.family == "resnet18_classifier" and (model.gan or model.predict_all_slices):
        raise UserError(
            f"{source}: model.family resnet18_classifier predicts one label per "
            "window: model.gan and model.predict_all_slices must be false"
        )
    return model


def validate_loss(loss: LossConfig, *, source: str = "config") -> LossConfig:
    """Ranges and combinations of `LossConfig` alone (`vfsearch.core.losses.build_loss` too)."""
    flat = flatten(loss, "loss.")
    _check_choices(flat, "loss.", source)
    for key in (
        "loss.dice_weight",
        "loss.bce_weight",
        "loss.adv_weight",
        "loss.extra_weight",
        "loss.focal_gamma",
    ):
        if flat[key] < 0:
            raise UserError(f"{source}: {key} must be >= 0, got {flat[key]}")
    if loss.pos_weight <= 0:
        raise UserError(f"{source}: loss.pos_weight must be > 0, got {loss.pos_weight}")
    if loss.dice_weight + loss.bce_weight + loss.extra_weight == 0:
        raise UserError(
            f"{source}: loss.dice_weight, loss.bce_weight and loss.extra_weight are "
            "all 0: nothing to train the segmentation on"
        )
    if loss.extra == "none" and loss.extra_weight > 0:
        raise UserError(f"{source}: loss.extra_weight > 0 needs loss.extra focal or tversky")
    if loss.extra != "none" and loss.extra_weight == 0:
        raise UserError(f"{source}: loss.extra={loss.extra} needs loss.extra_weight > 0")
    if loss.extra == "tversky":
        a, b = loss.tversky_alpha, loss.tversky_beta
        if not (0 <= a <= 1 and 0 <= b <= 1 and a + b > 0):
            raise UserError(
                f"{source}: loss.tversky_alpha and loss.tversky_beta must lie in "
                f"[0, 1], not both 0; got {a}, {b}"
            )
    return loss


def validate(config: Config, *, source: str = "config") -> Config:
    """Check ranges and combinations that a single field's type cannot express."""
    flat = config.flatten()
    _check_choices(flat, "", source)
    validate_model(config.model, source=source)
    validate_loss(config.loss, source=source)
    if config.data.seq_len % 2 == 0 or not 1 <= config.data.seq_len <= 9:
        raise UserError(f"{source}: data.seq_len must be odd and 1..9, got {config.data.seq_len}")
    if config.data.patch_size % (2**config.model.depth):
        raise UserError(
            f"{source}: data.patch_size {config.data.patch_size} must be divisible "
            f"by 2**model.depth = {2**config.model.depth}"
        )
    if config.loss.adv_weight > 0 and not config.model.gan:
        raise UserError(f"{source}: loss.adv_weight > 0 needs model.gan=true")
    if config.model.gan and config.loss.adv_weight == 0:
        raise UserError(
            f"{source}: model.gan=true needs loss.adv_weight > 0 (else the "
            "discriminator trains but never reaches the segmenter)"
        )
    if config.model.gan and config.data.patch_size < 3 * 2**config.model.disc_layers:
        raise UserError(
            f"{source}: data.patch_size {config.data.patch_size} is too small for "
            f"model.disc_layers={config.model.disc_layers} (needs >= "
            f"{3 * 2**config.model.disc_layers})"
        )
    if config.model.norm == "instance" and config.data.patch_size < 2 ** (config.model.depth + 1):
        raise UserError(
            f"{source}: model.norm=instance needs a bottleneck of at least 2x2 "
            f"pixels: data.patch_size >= {2 ** (config.model.depth + 1)}"
        )
    if config.model.predict_all_slices != config.data.target_all_slices:
        raise UserError(
            f"{source}: model.predict_all_slices and data.target_all_slices must "
            "be equal (the model predicts what the data provides)"
        )
    for key in ("train.lr", "data.augment", "data.oversample_fracture"):
        if flat[key] < 0:
            raise UserError(f"{source}: {key} must be >= 0, got {flat[key]}")
    if config.data.augment > 1:
        raise UserError(f"{source}: data.augment is a strength 0..1, got {config.data.augment}")
    if config.data.open_vertebrae < 1:
        raise UserError(
            f"{source}: data.open_vertebrae must be >= 1, got {config.data.open_vertebrae}"
        )
    validate_train(config.train, source=source)
    return config


def validate_train(train: TrainConfig, *, source: str = "config") -> TrainConfig:
    """Ranges of `TrainConfig` alone."""
    for key in ("epochs", "batch_size", "keep_checkpoints"):
        if getattr(train, key) < 1:
            raise UserError(f"{source}: train.{key} must be >= 1, got {getattr(train, key)}")
    for key in (
        "weight_decay",
        "grad_clip",
        "disc_lr",
        "warmup_epochs",
        "early_stop_patience",
        "num_workers",
        "max_windows_per_epoch",
        "max_failures",
        "val_windows",
    ):
        with_auto = key in ("max_failures", "num_workers", "val_windows")
        if getattr(train, key) < 0 and not (with_auto and getattr(train, key) == -1):
            auto = " (or -1: auto)" if with_auto else ""
            raise UserError(f"{source}: train.{key} must be >= 0{auto}, got {getattr(train, key)}")
    if train.gan_start_epoch < -1:
        raise UserError(
            f"{source}: train.gan_start_epoch must be >= 0, or -1 for epochs // 2; "
            f"got {train.gan_start_epoch}"
        )
    if not 0 < train.val_threshold < 1:
        raise UserError(
            f"{source}: train.val_threshold must lie in (0, 1), got {train.val_threshold}"
        )
    return train


__all__ = [
    "Config",
    "ModelConfig",
    "LossConfig",
    "DataConfig",
    "TrainConfig",
    "PLANES",
    "load_config",
    "with_overrides",
    "parse_overrides",
    "validate",
    "validate_model",
    "validate_loss",
    "validate_train",
    "flatten",
    "known_keys",
]
