"""Search spaces as data: YAML files compiled into an Optuna define-by-run function.

Schema (version 1)::

    version: 1
    description: free text
    metric: val_dice3d           # what Optuna optimises (reported as a best-so-far key)
    mode: max                    # max | min
    # multi-objective: lists, the first one ranks the table (Pareto front marked), e.g.
    # metric: [val_dice3d, model_params]   (or latency_ms: one forward pass, milliseconds)
    # mode: [max, min]
    epochs: 6                    # epochs per trial (ASHA's max_t)
    startup_trials: 10           # random trials before TPE models the results (Optuna's
                                 # n_startup_trials; fewer suits small sweeps)
    scheduler:                   # ASHA over epochs, acting on the per-epoch metric
      grace_period: 2
      reduction_factor: 3
      metric: val_dice           # per-epoch validation Dice (2D, all-reduced)
    fixed:                       # config keys held constant in every trial
      data.patch_size: 64
    params:                      # config keys the search samples
      loss.dice_weight: {type: float, low: 0.2, high: 2.0}
      train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      model.depth: {type: int, low: 3, high: 5}
      data.seq_len: {type: categorical, choices: [3, 5, 7, 9]}
      loss.adv_weight: {type: float, low: 0.001, high: 0.1, log: true,
                        when: {model.gan: true}}

Keys are the dotted keys of `vfsearch.core.config.Config`. A parameter that only exists when
another is set (the adversarial weight only with the GAN on, Tversky's alpha only with the
Tversky loss) must say so with ``when``, unless the key it depends on is fixed to the
enabling value. Every error names the file and the key, and happens before Ray starts.
Pure Python + yaml; Optuna is only touched through the ``trial`` object passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vfsearch.core.config import Config, known_keys, with_overrides
from vfsearch.core.errors import UserError

TOP_KEYS = {
    "version",
    "description",
    "metric",
    "mode",
    "epochs",
    "startup_trials",
    "scheduler",
    "fixed",
    "params",
}
SCHEDULER_KEYS = {"grace_period", "reduction_factor", "metric"}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}

# key -> (the key it depends on, the values that enable it)
DEPENDS_ON: dict[str, tuple[str, tuple[Any, ...]]] = {
    "loss.adv_weight": ("model.gan", (True,)),
    "loss.gan_mode": ("model.gan", (True,)),
    "model.disc_channels": ("model.gan", (True,)),
    "model.disc_layers": ("model.gan", (True,)),
    "model.disc_norm": ("model.gan", (True,)),
    "train.gan_start_epoch": ("model.gan", (True,)),
    "train.disc_lr": ("model.gan", (True,)),
    "loss.focal_gamma": ("loss.extra", ("focal",)),
    "loss.tversky_alpha": ("loss.extra", ("tversky",)),
    "loss.tversky_beta": ("loss.extra", ("tversky",)),
    "loss.extra_weight": ("loss.extra", ("focal", "tversky")),
    "model.bidirectional": ("model.temporal", ("lstm", "lstm_pooled", "convlstm")),
    "model.temporal_hidden": ("model.temporal", ("lstm", "lstm_pooled", "convlstm")),
    "model.encoder_weights": ("model.encoder", ("resnet18", "resnet34")),
}


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    path: str
    objectives: tuple[tuple[str, str], ...] = (("val_dice3d", "max"),)  # (metric, mode)s
    epochs: int = 6
    startup_trials: int = 10
    grace_period: int = 1
    reduction_factor: int = 3
    scheduler_metric: str = "val_dice"
    fixed: dict[str, Any] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    description: str = ""

    @property
    def metric(self) -> str:
        """The primary objective: Optuna's only one, or the first (it ranks the table)."""
        return self.objectives[0][0]

    @property
    def mode(self) -> str:
        return self.objectives[0][1]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def define_by_run(self, trial) -> dict[str, Any]:
        """Sample one trial's config keys with an Optuna ``trial``; returns the fixed keys.

        Does no computation beyond sampling (Optuna's define-by-run contract).
        """
        values: dict[str, Any] = dict(self.fixed)
        for p in self.params:
            if any(values.get(k) != v for k, v in p.when):
                continue
            if p.type == "float":
                values[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                values[p.key] = trial.suggest_int(p.key, p.low, p.high, log=p.log, step=p.step or 1)
            else:
                values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        return dict(self.fixed)

    def config_for(self, sampled: dict[str, Any], base: Config | None = None) -> Config:
        """The trial's `Config`: base, then fixed keys, then sampled keys."""
        return with_overrides(base or Config(), {**self.fixed, **sampled}, source=self.path)


def _err(path: str, key: str, problem: str) -> UserError:
    return UserError(f"{path}: {key}: {problem}")


PACKAGED = Path(__file__).resolve().parents[1] / "search_spaces"


def packaged_spaces() -> list[str]:
    """The names of the search spaces shipped inside the package (``default``, ``real``, ...)."""
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def resolve_space(path: str | Path) -> Path:
    """A YAML file path, or the name of a packaged space (``default`` -> its shipped file)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.suffix == "" and len(p.parts) == 1 and (PACKAGED / f"{p.name}.yaml").is_file():
        return PACKAGED / f"{p.name}.yaml"
    raise UserError(
        f"{path}: search space file not found (packaged spaces: {', '.join(packaged_spaces())})"
    )


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file, or a packaged space by name."""
    file = resolve_space(path)
    src = str(file) if Path(path).is_file() else str(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{src}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{src}: expected a mapping with 'params'")
    for key in raw:
        if key not in TOP_KEYS:
            raise _err(src, key, f"unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    if raw.get("version", 1) != 1:
        raise _err(src, "version", f"unsupported version {raw.get('version')!r} (know 1)")
    objectives = _objectives(src, raw.get("metric", "val_dice3d"), raw.get("mode", "max"))
    epochs = _positive_int(src, "epochs", raw.get("epochs", 6))
    startup = raw.get("startup_trials", 10)
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise _err(src, "startup_trials", f"must be an integer >= 0, got {startup!r}")
    sched = raw.get("scheduler") or {}
    if not isinstance(sched, dict):
        raise _err(src, "scheduler", "must be a mapping")
    for key in sched:
        if key not in SCHEDULER_KEYS:
            raise _err(
                src,
                f"scheduler.{key}",
                f"unknown key (allowed: {', '.join(sorted(SCHEDULER_KEYS))})",
            )
    grace = _positive_int(src, "scheduler.grace_period", sched.get("grace_period", 1))
    rf = _positive_int(src, "scheduler.reduction_factor", sched.get("reduction_factor", 3))
    if rf < 2:
        raise _err(src, "scheduler.reduction_factor", f"must be >= 2, got {rf}")
    if grace > epochs:
        raise _err(src, "scheduler.grace_period", f"{grace} exceeds epochs {epochs}")

    types = known_keys()
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _err(src, "fixed", "must be a mapping of config keys to values")
    for key in fixed:
        if key not in types:
            raise _err(src, f"fixed.{key}", "unknown config key")
    base_flat = with_overrides(Config(), fixed, source=f"{src}: fixed", check=False).flatten()

    raw_params = raw.get("params") or {}
    if not isinstance(raw_params, dict) or not raw_params:
        raise _err(src, "params", "must be a non-empty mapping of config keys to ranges")
    params: list[Param] = []
    for key, spec in raw_params.items():
        params.append(_param(src, key, spec, types))
    sampled = {p.key for p in params}
    for key in sampled & set(fixed):
        raise _err(src, f"params.{key}", "is both fixed and sampled")
    by_key = {p.key: p for p in params}
    for p in params:
        for dep, value in p.when:
            if dep not in types:
                raise _err(src, f"params.{p.key}.when", f"unknown config key {dep!r}")
            if dep not in by_key and dep not in fixed:
                raise _err(src, f"params.{p.key}.when", f"{dep} is neither sampled nor fixed")
            dep_param = by_key.get(dep)
            if (
                dep_param is not None
                and dep_param.type == "categorical"
                and value not in dep_param.choices
            ):
                raise _err(src, f"params.{p.key}.when", f"{dep} never takes {value!r}")
        _check_dependency(src, p, by_key, base_flat)
    return SearchSpace(
        path=src,
        objectives=objectives,
        epochs=epochs,
        startup_trials=startup,
        grace_period=grace,
        reduction_factor=rf,
        scheduler_metric=str(sched.get("metric", "val_dice")),
        fixed=dict(fixed),
        params=tuple(params),
        description=str(raw.get("description", "")),
    )


def _objectives(src: str, metric: Any, mode: Any) -> tuple[tuple[str, str], ...]:
    """``metric``/``mode``: one name and max|min, or equal-length lists (multi-objective)."""
    metrics = metric if isinstance(metric, list) else [metric]
    modes = mode if isinstance(mode, list) else [mode]
    if not metrics or len(metrics) > 3 or not all(isinstance(m, str) and m for m in metrics):
        raise _err(
            src, "metric", f"must be a metric name or a list of 1 to 3 names, got {metric!r}"
        )
    if len(set(metrics)) != len(metrics):
        raise _err(src, "metric", f"lists a metric twice: {metric!r}")
    if len(modes) != len(metrics):
        raise _err(src, "mode", f"needs one max|min per metric ({len(metrics)}), got {mode!r}")
    for m in modes:
        if m not in ("max", "min"):
            raise _err(src, "mode", f"must be max or min, got {m!r}")
    return tuple(zip(metrics, modes, strict=True))


def _positive_int(src: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _err(src, key, f"must be a positive integer, got {value!r}")
    return value


def _param(src: str, key: str, spec: Any, types: dict[str, type]) -> Param:
    where = f"params.{key}"
    if key not in types:
        raise _err(src, where, "unknown config key")
    if not isinstance(spec, dict) or "type" not in spec:
        raise _err(src, where, "expected a mapping with 'type' (float, int or categorical)")
    kind = spec["type"]
    if kind not in PARAM_KEYS:
        raise _err(src, f"{where}.type", f"must be float, int or categorical, got {kind!r}")
    for k in spec:
        if k not in PARAM_KEYS[kind]:
            raise _err(src, f"{where}.{k}", f"unknown key for a {kind} parameter")
    when_raw = spec.get("when") or {}
    if not isinstance(when_raw, dict):
        raise _err(src, f"{where}.when", "must be a mapping of config keys to values")
    when = tuple(when_raw.items())
    tp = types[key]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _err(src, f"{where}.choices", "must be a non-empty list")
        for c in choices:
            if not _fits(c, tp):
                raise _err(src, f"{where}.choices", f"{c!r} is not a {tp.__name__}")
        return Param(key, kind, choices=tuple(choices), when=when)
    if tp not in (int, float) or (kind == "float" and tp is int):
        raise _err(
            src,
            f"{where}.type",
            f"{key} is a {tp.__name__}; use {'categorical' if tp not in (int, float) else 'int'}",
        )
    bounds: dict[str, float | int] = {}
    for name in ("low", "high"):
        v = spec.get(name)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or (kind == "int" and not isinstance(v, int))
        ):
            what = "an integer" if kind == "int" else "a number"
            raise _err(src, f"{where}.{name}", f"must be {what}, got {v!r}")
        bounds[name] = v
    low, high = bounds["low"], bounds["high"]
    if low >= high:
        raise _err(src, where, f"empty range: low {low} >= high {high}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise _err(src, f"{where}.log", f"log scale needs low > 0, got {low}")
    return Param(key, kind, low=low, high=high, log=log, step=spec.get("step"), when=when)


def _fits(value: Any, tp: type) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_dependency(src: str, p: Param, by_key: dict[str, Param], base: dict[str, Any]) -> None:
    """A conditional key needs ``when`` on its enabling key, unless that key is fixed on."""
    dep = DEPENDS_ON.get(p.key)
    if dep is None:
        return
    dep_key, enabling = dep
    conds = dict(p.when)
    if dep_key in conds:
        if conds[dep_key] not in enabling:
            raise _err(
                src,
                f"params.{p.key}.when",
                f"{dep_key} must be one of {list(enabling)} for {p.key} to exist",
            )
        return
    if dep_key not in by_key and base[dep_key] in enabling:
        return  # fixed (or defaulted) to an enabling value
    raise _err(
        src,
        f"params.{p.key}",
        f"only exists when {dep_key} is "
        f"{' or '.join(map(str, enabling))}: add when: {{{dep_key}: {enabling[0]!r}}} "
        f"or fix {dep_key}",
    )
