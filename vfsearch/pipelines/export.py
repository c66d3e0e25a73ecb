"""``vfsearch export``: promote the best trained model to the MLflow Model Registry and write a
self-contained bundle.

Steps (`export`):

1. **Select** one training run (`choose`) by a metric (default ``val_dice3d``, the fused 3D
   validation Dice of a sweep) among

   * ``sweep``: the child runs of the sweep's parent run (experiment ``vfsearch-sweeps``, tag
     ``vfsearch.sweep``), i.e. its trials;
   * ``experiment``: the runs of an experiment (sweep parent runs excluded);
   * ``run``: one run id.

   A run is a candidate when it is finished (MLflow status FINISHED, or tagged ``stopped
   early`` by the sweep: a trial ASHA stopped counts only if it reports the metric), not
   tagged ``failed``, and its metric is a finite number (NaN is skipped). Best by ``mode``
   (``max``: higher is better). **Ties** (equal values) go to the run that finished first,
   then to the smaller run id, so the choice is deterministic; model size is not used
   because it would need every tied checkpoint downloaded. A candidate without a checkpoint
   artifact (``checkpoints/*.pt``) is passed over for the next one.
2. **Gate** (`promotion_decision`): the alias (default ``champion``) moves to the
   challenger only if its metric beats the current champion's (strictly, by ``mode``) and,
   with ``minimum``, if the lower bound of its bootstrap interval (``<metric>_ci_low``,
   logged by ``vfsearch evaluate --split val``) beats ``minimum``. Otherwise `UserError`
   with both figures, unless ``force``. Checked before anything is written.
3. **Bundle** (`vfsearch.adapters.bundle.write_bundle`) in ``out``: weights, TorchScript, ONNX
   when it exports cleanly, config.json and MODEL_CARD.md (`model_card`).
4. **Register** (`vfsearch.adapters.tracking.registry.log_and_register`): the bundle as a
   pyfunc `LoggedModel` linked to the run, a new version of the registered model tagged
   ``vfsearch.run_id`` (every tag name: `vfsearch.adapters.tracking.schema`), and the alias
   pointed at it. Re-exporting a run that already has a version reuses that version (no new
   one): export is idempotent.
5. **Top-k ensembles** (``top_k`` K > 1, ``--top-k``): the K best candidates with a checkpoint
   (same ranking; fewer than K is a `UserError` before anything is written) become one model
   that averages their probability maps (`vfsearch.pipelines.predict.crop_probability`; planes may
   differ, spacing and margin must agree). Decisions:

   * **The gate judges the ensemble**, never a member: its value is the ensemble's own fused
     figure (`vfsearch.pipelines.evaluate.fused_validation_metrics` of the members together) on the
     ``val`` split of the training store (``store``, else the store the members' ``store``
     tags share), scored at thresholds cross-fitted on halves of val, so no case is scored
     at a threshold tuned on it (DESIGN.md, "Honest selection"). ``metric`` must be one of
     those ``val_*`` figures; the deployment threshold is its ``val_threshold3d`` (chosen on
     all of val). The test split is never read. The members were ranked on val too, so the
     value still favours them, exactly as a single run's does.
   * **Bundle**: `vfsearch.adapters.bundle.write_ensemble` (``members/<i>/`` each a full
     single-model bundle, best first; a top-level config.json lists them with the ensemble's
     threshold).
   * **Registry**: the LoggedModel and version are linked to the best member's run and tagged
     ``vfsearch.members`` (every member's run id, best first), ``vfsearch.member_values``
     (their metric) and ``vfsearch.metric_value`` (the ensemble's, what a later gate
     compares with). Idempotence is by the set of members
     (`vfsearch.adapters.tracking.registry.version_of_run`): the same K runs reuse their
     version; a single run never matches an ensemble holding it.
   * Pictures of the model on a validation case are drawn for single runs only.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import vfsearch
from vfsearch.adapters import tracking
from vfsearch.adapters.bundle import read_config, write_bundle, write_ensemble
from vfsearch.adapters.store import Store
from vfsearch.adapters.tracking import Tracker, registry
from vfsearch.adapters.tracking.schema import (
    BEST_CHECKPOINT,
    BEST_TRIAL_TAG,
    CHECKPOINTS_DIR,
    CI_HIGH_SUFFIX,
    CI_LOW_SUFFIX,
    DEFAULT_METRIC,
    EVAL_THRESHOLD_TAG,
    FINGERPRINT_TAG,
    GIT_COMMIT_TAG,
    MEMBER_VALUES_TAG,
    MEMBERS_TAG,
    METRIC_MODE_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    PARENT_RUN_TAG,
    SEARCH_SPACE_DIR,
    SPACE_FILE_TAG,
    STATUS_TAG,
    STORE_TAG,
    SWEEP_EXPERIMENT,
    SWEEP_TAG,
    THRESHOLD_METRIC,
    TOP_K_TAG,
    TRIAL_TAG,
    VERSION_RUN_TAG,
    VISUALISATIONS_DIR,
)
from vfsearch.core.errors import UserError
from vfsearch.core.inference import LoadedModel
from vfsearch.pipelines.evaluate import fused_validation_metrics
from vfsearch.pipelines.predict import CHECKPOINT_SUFFIXES, load_checkpoint
from vfsearch.pipelines.visualize import log_visualisations

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

DEFAULT_NAME = "vfsearch-fracture"
DEFAULT_ALIAS = "champion"
ENSEMBLE_SPLIT = "val"  # the split that judges an ensemble; export never reads test
# figures of fused_validation_metrics selected on the cases they score: never a gate value
OPTIMISTIC_SUFFIXES = ("_tuned", "_threshold3d")


# -- selection (pure) ----------------------------------------------------------------------


@dataclass
class Candidate:
    """One MLflow run as export sees it (plain data, no mlflow objects)."""

    run_id: str
    run_name: str = ""
    experiment_id: str = ""
    status: str = "FINISHED"  # MLflow run status
    end_time: int | None = None  # ms since epoch
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """How the run ended: the sweep's ``vfsearch.status`` tag, else the MLflow status."""
        return self.tags.get(STATUS_TAG) or self.status.lower()

    def value(self, metric: str) -> float | None:
        v = self.metrics.get(metric)
        return None if v is None else float(v)

    @classmethod
    def from_run(cls, run: Run) -> Candidate:
        """From an `mlflow.entities.Run`."""
        return cls(
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            experiment_id=run.info.experiment_id,
            status=run.info.status,
            end_time=run.info.end_time,
            metrics=dict(run.data.metrics),
            params=dict(run.data.params),
            tags=dict(run.data.tags),
        )


def is_finished(c: Candidate) -> bool:
    """Finished for export: MLflow FINISHED or a sweep trial tagged ``stopped early``; never a
    trial tagged ``failed`` (a run still RUNNING, FAILED or KILLED otherwise is not)."""
    tag = c.tags.get(STATUS_TAG, "")
    if tag == "failed" or c.status == "FAILED":
        return False
    return c.status == "FINISHED" or tag == "stopped early"


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def rank(candidates: Iterable[Candidate], metric: str, mode: str = "max") -> list[Candidate]:
    """Candidates with a finite ``metric``, best first; ties: earlier end time, then run id."""
    usable = [c for c in candidates if (v := c.value(metric)) is not None and math.isfinite(v)]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(
        usable,
        key=lambda c: (
            sign * c.value(metric),  # type: ignore[operator]
            c.end_time if c.end_time is not None else math.inf,
            c.run_id,
        ),
    )


def choose(candidates: Sequence[Candidate], metric: str, mode: str, what: str) -> list[Candidate]:
    """Rank the finished ``candidates`` of ``what`` (e.g. ``"sweep s1"``) by ``metric``.

    `UserError` (one line) when none is finished, none reports the metric, or every value is
    NaN; the message counts the runs by how they ended.
    """
    finished = [c for c in candidates if is_finished(c)]
    if not finished:
        counts: dict[str, int] = {}
        for c in candidates:
            counts[c.state] = counts.get(c.state, 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none at all"
        raise UserError(f"{what}: no finished run to export ({len(candidates)} run(s): {detail})")
    reporting = [c for c in finished if metric in c.metrics]
    if not reporting:
        logged = sorted({k for c in finished for k in c.metrics})
        raise UserError(
            f"--metric: no finished run of {what} reports {metric!r} (they log: "
            f"{', '.join(logged[:12]) or 'no metrics'}"
            f"{', ...' if len(logged) > 12 else ''})"
        )
    ranked = rank(reporting, metric, mode)
    if not ranked:
        raise UserError(f"--metric: every finished run of {what} has {metric} = NaN")
    return ranked


# -- the promotion gate (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Outcome of the gate: ``promote`` (move the alias) and why, in one line."""

    promote: bool
    reason: str


def promotion_decision(
    challenger: float,
    champion: float | None,
    *,
    metric: str,
    mode: str = "max",
    ci_low: float | None = None,
    minimum: float | None = None,
    same_run: bool = False,
    no_interval: str | None = None,
) -> Decision:
    """May the alias move to a challenger scoring ``challenger`` (vs ``champion``; None: no
    champion yet)? It must beat the champion strictly by ``mode``; with ``minimum``, the
    lower bound ``ci_low`` of its interval must beat ``minimum`` too (a missing bound
    fails; ``no_interval`` says where one would come from). ``same_run``: the champion
    already is this run (or this ensemble: nothing to move)."""
    if minimum is not None:
        if ci_low is None or not math.isfinite(ci_low):
            hint = no_interval or "run `vfsearch evaluate --split val` on it first"
            return Decision(False, f"--min: the challenger has no {metric}{CI_LOW_SUFFIX} ({hint})")
        if not _better(ci_low, minimum, mode):
            return Decision(
                False,
                f"--min: the challenger's {metric}{CI_LOW_SUFFIX} "
                f"{ci_low:.4f} does not beat --min {minimum:.4f}",
            )
    if same_run:
        return Decision(True, "already the champion")
    if champion is None:
        return Decision(True, "no champion yet")
    if not math.isfinite(champion):
        return Decision(True, f"the champion's {metric} is NaN")
    if _better(challenger, champion, mode):
        return Decision(True, f"{metric} {challenger:.4f} beats the champion's {champion:.4f}")
    return Decision(False, f"{metric} {challenger:.4f} does not beat the champion's {champion:.4f}")


# -- the command -------------------------------------------------------------------------


@dataclass
class ExportSummary:
    """What `export` did. For an ensemble (``members`` not empty) ``run_id``/``run_name`` are
    its best member's and ``value`` is the ensemble's own validation figure."""

    run_id: str
    run_name: str
    metric: str
    value: float
    selected_from: str
    model_name: str
    alias: str
    version: str
    new_version: bool
    alias_moved: bool
    decision: str
    previous: dict[str, Any] | None = None  # champion before: version, run_id, value
    bundle: str | None = None
    onnx: str | None = None
    threshold: float | None = None
    skipped: list[str] = field(default_factory=list)
    tracking_uri: str = ""
    members: list[dict[str, Any]] = field(default_factory=list)  # run_id, run_name, value

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}"

    def __str__(self) -> str:
        if self.members:
            names = ", ".join(
                f"{m['run_id']} ({m['run_name']}) {m['value']:.4f}" for m in self.members
            )
            lines = [
                f"selected an ensemble of {len(self.members)} runs from "
                f"{self.selected_from}: {names}",
                f"ensemble {self.metric} {self.value:.4f} (its own fused validation; "
                f"threshold {_fmt(self.threshold)})",
            ]
        else:
            lines = [
                (
                    f"selected run {self.run_id} ({self.run_name}) from "
                    f"{self.selected_from}: {self.metric} {self.value:.4f}"
                )
            ]
        lines += [f"  passed over {s}" for s in self.skipped]
        same = "same runs" if self.members else "same run"
        lines.append(
            f"{self.model_name} version {self.version}"
            + (" (new)" if self.new_version else f" (existing: {same}, no new version)")
        )
        if self.alias_moved:
            prev = (
                f" (was version {self.previous['version']}, {self.metric} "
                f"{_fmt(self.previous.get('value'))})"
                if self.previous
                else ""
            )
            lines.append(f"alias {self.alias} -> version {self.version}{prev}: {self.decision}")
        else:
            lines.append(f"alias {self.alias} unchanged: {self.decision}")
        if self.bundle:
            lines.append(f"bundle: {self.bundle} (ONNX: {self.onnx})")
        lines.append(
            f"load with mlflow.pyfunc.load_model({self.model_uri!r}) or "
            f"vfsearch predict --model {self.model_uri}"
        )
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"


def export(
    *,
    sweep: str | None = None,
    experiment: str | None = None,
    run: str | None = None,
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
    name: str = DEFAULT_NAME,
    alias: str = DEFAULT_ALIAS,
    out: str | os.PathLike | None = None,
    force: bool = False,
    minimum: float | None = None,
    store: str | os.PathLike | Store | None = None,
    top_k: int = 1,
    onnx: bool = True,
    torch_export: bool = False,
    workdir: str | os.PathLike = "mlruns",
    mlflow_uri: str | None = None,
    echo: Callable[[str], Any] = lambda _: None,
) -> ExportSummary:
    """``vfsearch export``: select, gate, bundle, register and alias (module docstring).

    Exactly one of ``sweep`` (sweep name), ``experiment`` (experiment name) or ``run`` (run
    id). ``mode``: ``max`` or ``min`` (how ``metric`` improves). ``name``/``alias``: the
    registered model and the alias to move. ``out``: bundle folder (None: none written; the
    registry still gets one). ``force``: move the alias even when the gate refuses.
    ``minimum``: lower bound the challenger's ``<metric>_ci_low`` must beat. ``store``: the
    training store, for checkpoints that do not carry its spacing, margin and fingerprint
    (default: the run's ``store`` tag); with ``top_k`` > 1 also the store whose val split
    judges the ensemble. ``top_k``: export the ``top_k`` best candidates as one ensemble
    (module docstring, step 5). ``onnx``/``torch_export``: also write ``model.onnx`` /
    ``model.pt2`` (each checked against the eager model). ``mlflow_uri``: default
    ``$MLFLOW_TRACKING_URI`` or the embedded server of ``workdir``. Every user-fixable
    problem is a one-line `UserError`; so is a refusal of the gate (exit code 2 in the CLI).
    """
    given = [o for o, v in (("--sweep", sweep), ("--experiment", experiment), ("--run", run)) if v]
    if len(given) != 1:
        raise UserError(
            f"--sweep/--experiment/--run: give exactly one, got {', '.join(given) or 'none'}"
        )
    if mode not in ("max", "min"):
        raise UserError(f"--mode: max or min, got {mode!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"--top-k: the number of best runs to export, 1 or more; got {top_k}")
    if top_k > 1 and (
        not metric.startswith(ENSEMBLE_SPLIT + "_") or metric.endswith(OPTIMISTIC_SUFFIXES)
    ):
        raise UserError(
            f"--metric: --top-k judges the ensemble on its own fused {ENSEMBLE_SPLIT} "
            f"figures ({ENSEMBLE_SPLIT}_dice3d, {ENSEMBLE_SPLIT}_iou3d, ...); "
            f"{metric!r} is not one of them"
        )
    if not name or not re.match(r"^[A-Za-z0-9][\w.\-]*$", name):
        raise UserError(f"--name: {name!r} is not a valid registered model name")
    if (
        not re.match(r"^[A-Za-z_][\w\-]*$", alias)
        or alias == "latest"
        or re.match(r"^[vV]\d+$", alias)
    ):
        raise UserError(
            f"--alias: {alias!r} is not a valid alias (letters, digits, _ and -; "
            f"not 'latest' or v<number>)"
        )
    uri = mlflow_uri or tracking.tracking_uri(workdir)
    tracker = Tracker(uri)

    ranked, what, sweep_parent = _candidates(
        tracker, sweep=sweep, experiment=experiment, run=run, metric=metric, mode=mode, uri=uri
    )
    picked, skipped = _with_checkpoints(tracker, ranked, what, metric, top_k)
    members = [c for c, _ in picked]
    chosen = members[0]
    runs = [c.run_id for c in members]
    ensemble = top_k > 1
    eval_store = _ensemble_store(store, members, top_k) if ensemble else None
    if ensemble:
        echo(
            f"selected an ensemble of {top_k} runs from {what}: "
            + ", ".join(
                f"{c.run_id} ({c.run_name}) {metric} {c.metrics[metric]:.4f}" for c in members
            )
        )
    else:
        echo(
            f"selected run {chosen.run_id} ({chosen.run_name}) from {what}: {metric} "
            f"{chosen.metrics[metric]:.4f}"
        )
    label = f"ensemble of runs {', '.join(runs)}" if ensemble else f"run {chosen.run_id}"

    existing = registry.version_of_run(tracker, name, runs)
    champ = registry.champion(tracker, name, alias)
    previous: dict[str, Any] | None = None
    champ_value = None
    same = False
    if champ is not None:
        champ_runs = registry.exported_runs(champ)
        champ_value = _champion_value(tracker, champ, metric)
        previous = {
            "version": str(champ.version),
            "value": champ_value,
            "run_id": champ.tags.get(VERSION_RUN_TAG) or champ.run_id or "",
        }
        if (champ.tags or {}).get(MEMBERS_TAG):
            previous["members"] = champ.tags[MEMBERS_TAG].split(",")
        same = champ_runs == frozenset(runs)
        if champ_value is None and not same and not force:
            theirs = "" if ensemble else f" {chosen.metrics[metric]:.4f}"
            raise UserError(
                f"{name}@{alias}: the champion (version {champ.version}, "
                f"{_what_version(previous)}) has no {metric} to compare with the "
                f"challenger's{theirs}; pass --force to move the alias"
            )

    threshold_source = ""
    validation: dict[str, float] = {}
    if ensemble:
        loaded = [_load_candidate(tracker, c, ckpt, store)[0] for c, ckpt in picked]
        _check_compatible(loaded, top_k)
        value, ci_low, validation = _judge_ensemble(loaded, str(eval_store), metric, top_k)
        threshold = validation.get(f"{ENSEMBLE_SPLIT}_threshold3d")
        threshold_source = (
            f"the ensemble's {ENSEMBLE_SPLIT}_threshold3d (maximum pooled 3D "
            f"Dice of the averaged map on the {ENSEMBLE_SPLIT} split of "
            f"{eval_store})"
        )
        echo(
            f"ensemble {metric} {value:.4f} on the {ENSEMBLE_SPLIT} split of {eval_store} "
            f"(threshold {_fmt(threshold)})"
        )
    else:
        value = float(chosen.metrics[metric])
        ci_low = chosen.value(metric + CI_LOW_SUFFIX)
    no_interval = (
        f"the ensemble's {ENSEMBLE_SPLIT} figures carry none; drop --min or export --top-k 1"
        if ensemble
        else None
    )
    decision = promotion_decision(
        value,
        champ_value,
        metric=metric,
        mode=mode,
        ci_low=ci_low,
        minimum=minimum,
        same_run=same,
        no_interval=no_interval,
    )
    if not decision.promote:
        if not force:
            champ_text = (
                f"the champion {name}@{alias} is version {previous['version']} "
                f"({_what_version(previous)}) with {metric} {_fmt(champ_value)}"
                if previous
                else f"no champion {name}@{alias} yet"
            )
            raise UserError(
                f"{name}@{alias}: challenger {label} refused: "
                f"{decision.reason}; {champ_text}; nothing written (pass "
                f"--force to promote anyway)"
            )
        decision = Decision(True, f"forced ({decision.reason})")

    sweep_info = _sweep_info(tracker, chosen, sweep_parent)
    if ensemble:
        member_rows = [
            {"run_id": c.run_id, "run_name": c.run_name, "value": c.metrics[metric]}
            for c in members
        ]
        card = ensemble_card(
            members,
            loaded,
            metric=metric,
            mode=mode,
            what=what,
            name=name,
            alias=alias,
            sweep=sweep_info,
            value=value,
            validation=validation,
            threshold=threshold,
            threshold_source=threshold_source,
            store=str(eval_store),
            tracking_uri=uri,
        )
        info = {
            "run_ids": runs,
            "experiment_id": chosen.experiment_id,
            "metric": metric,
            "metric_value": value,
            "metric_mode": mode,
            "metric_source": f"the ensemble's fused {ENSEMBLE_SPLIT} figures",
            "threshold_source": threshold_source,
            "validation": validation,
            "validation_store": str(eval_store),
            "sweep": sweep_info.get("name"),
            "sweep_run_id": sweep_info.get("run_id"),
            "registered_model": name,
        }
        member_info = [_provenance(c, metric, mode) for c in members]
        tags = {
            VERSION_RUN_TAG: chosen.run_id,
            MEMBERS_TAG: ",".join(runs),
            MEMBER_VALUES_TAG: ",".join(repr(float(c.metrics[metric])) for c in members),
            TOP_K_TAG: str(top_k),
        }
    else:
        single, threshold_source = _load_candidate(tracker, chosen, picked[0][1], store)
        loaded = [single]
        threshold = single.threshold
        member_rows = []
        card = model_card(
            chosen,
            single,
            metric=metric,
            mode=mode,
            what=what,
            name=name,
            alias=alias,
            sweep=sweep_info,
            threshold_source=threshold_source,
            tracking_uri=uri,
        )
        info = {
            **_provenance(chosen, metric, mode),
            "threshold_source": threshold_source,
            "sweep": sweep_info.get("name"),
            "sweep_run_id": sweep_info.get("run_id"),
            "registered_model": name,
        }
        member_info = []
        tags = {VERSION_RUN_TAG: chosen.run_id}

    def write(folder: str | os.PathLike) -> Path:
        if ensemble:
            return write_ensemble(
                loaded,
                folder,
                threshold=threshold,
                info=info,
                member_info=member_info,
                card=card,
                onnx=onnx,
                torch_export=torch_export,
            )
        return write_bundle(
            loaded[0], folder, info=info, card=card, onnx=onnx, torch_export=torch_export
        )

    bundle_path = None
    onnx_status = None
    if out is not None:
        bundle_path = write(out)
        onnx_status = _onnx_status(bundle_path)
        echo(f"wrote bundle {bundle_path} (ONNX: {onnx_status})")
    new_version = existing is None
    if existing is None:
        tags.update({METRIC_TAG: metric, METRIC_VALUE_TAG: repr(value), METRIC_MODE_TAG: mode})
        if sweep_info.get("name"):
            tags[SWEEP_TAG] = sweep_info["name"]
        with tempfile.TemporaryDirectory(prefix="vfsearch-export-") as tmp:
            src = bundle_path
            if src is None:
                src = write(Path(tmp, "bundle"))
                onnx_status = _onnx_status(src)
            version = registry.log_and_register(
                src,
                tracker=tracker,
                run_id=chosen.run_id,
                experiment_id=chosen.experiment_id,
                name=name,
                tags=tags,
                spacing=loaded[0].spacing,
            )
        version_id = str(version.version)
        echo(f"registered {name} version {version_id}")
        if ensemble:
            echo(
                "pictures: not drawn for an ensemble (vfsearch visualize --model BUNDLE draws them)"
            )
        else:
            _log_pictures(
                tracker,
                chosen.run_id,
                loaded[0],
                store or chosen.tags.get(STORE_TAG),
                f"{VISUALISATIONS_DIR}/{name}-v{version_id}",
                echo,
            )
    else:
        version_id = str(existing.version)
    moved = not same or previous is None or previous["version"] != version_id
    if moved:
        registry.set_alias(tracker, name, alias, version_id)
    return ExportSummary(
        run_id=chosen.run_id,
        run_name=chosen.run_name,
        metric=metric,
        value=value,
        selected_from=what,
        model_name=name,
        alias=alias,
        version=version_id,
        new_version=new_version,
        alias_moved=moved,
        decision=decision.reason,
        previous=previous,
        bundle=str(bundle_path) if bundle_path else None,
        onnx=onnx_status,
        threshold=threshold,
        skipped=skipped,
        tracking_uri=uri,
        members=member_rows,
    )


def _what_version(previous: Mapping[str, Any]) -> str:
    """``run R`` or ``ensemble of runs A, B`` for a champion as `export` describes it."""
    if previous.get("members"):
        return f"ensemble of runs {', '.join(previous['members'])}"
    return f"run {previous['run_id']}"


def _provenance(c: Candidate, metric: str, mode: str) -> dict[str, Any]:
    """A run's provenance for a bundle's config.json."""
    return {
        "run_id": c.run_id,
        "run_name": c.run_name,
        "experiment_id": c.experiment_id,
        "metric": metric,
        "metric_value": float(c.metrics[metric]),
        "metric_mode": mode,
        "dataset_fingerprint": c.tags.get(FINGERPRINT_TAG),
        "git_commit": c.tags.get(GIT_COMMIT_TAG),
    }


def _ensemble_store(
    store: str | os.PathLike | Store | None, members: Sequence[Candidate], top_k: int
) -> str:
    """The store whose val split judges an ensemble: ``store``, else the ``store`` tag the
    members share when that folder exists here; `UserError` otherwise."""
    if store is not None:
        if not Path(str(store)).exists():
            raise UserError(f"--store: {store} does not exist")
        return str(store)
    tagged = {c.tags.get(STORE_TAG) for c in members}
    if len(tagged) == 1 and (only := tagged.pop()) and Path(only).exists():
        return only
    raise UserError(
        f"--top-k {top_k}: the ensemble is judged on the {ENSEMBLE_SPLIT} split of "
        f"its training store; pass --store (its runs name no shared store that "
        f"exists here)"
    )


def _check_compatible(loaded: Sequence[LoadedModel], top_k: int) -> None:
    """Ensemble members average crop maps voxel by voxel: same spacing and margin."""
    first = loaded[0]
    for m in loaded[1:]:
        if tuple(m.spacing) != tuple(first.spacing) or m.margin_mm != first.margin_mm:
            raise UserError(
                f"--top-k {top_k}: run {m.run_id} was trained on crops of spacing "
                f"{tuple(m.spacing)} mm / margin {m.margin_mm} mm, run "
                f"{first.run_id} on {tuple(first.spacing)} / {first.margin_mm}; "
                f"ensemble members must share them"
            )


def _judge_ensemble(
    loaded: list[LoadedModel], store: str, metric: str, top_k: int
) -> tuple[float, float | None, dict[str, float]]:
    """The ensemble's own ``metric`` (cross-fitted: honest), the lower bound of its interval
    when one is given, and every fused figure, on the val split of ``store`` (never test)."""
    validation = fused_validation_metrics(loaded, store, split=ENSEMBLE_SPLIT)
    if not validation:
        raise UserError(
            f"--store: {store} has no complete {ENSEMBLE_SPLIT} cases to judge the "
            f"--top-k {top_k} ensemble on"
        )
    value = validation.get(metric)
    if value is None:
        figures = sorted(k for k in validation if not k.endswith(OPTIMISTIC_SUFFIXES))
        raise UserError(
            f"--metric: the ensemble's fused {ENSEMBLE_SPLIT} figures have no "
            f"{metric!r} (they are: {', '.join(figures[:12])}"
            f"{', ...' if len(figures) > 12 else ''})"
        )
    if not math.isfinite(value):
        raise UserError(
            f"--top-k {top_k}: the ensemble's {metric} is NaN on the "
            f"{ENSEMBLE_SPLIT} split of {store} (no fracture to score?)"
        )
    ci_low = validation.get(metric + CI_LOW_SUFFIX)
    return float(value), (None if ci_low is None else float(ci_low)), dict(validation)


def _log_pictures(
    tracker: Tracker,
    run_id: str,
    loaded: LoadedModel,
    store: str | os.PathLike | Store | None,
    artifact_path: str,
    echo: Callable[[str], Any],
) -> None:
    """Heatmaps, attention maps and 3D renders of the exported model, on its training run.

    Drawn on a validation case of the training store when that store is reachable (``--store``
    or the run's ``store`` tag); skipped otherwise. Never fails an export.
    """
    if not store or not Path(str(store)).exists():
        return
    try:
        paths = log_visualisations(tracker, run_id, loaded, store, artifact_path=artifact_path)
        echo(f"logged {len(paths)} picture(s) to run {run_id} under {artifact_path}/")
    except Exception as exc:  # noqa: BLE001 - pictures are a courtesy, not the export
        echo(f"warning: could not draw pictures of the exported model ({exc})")


def _onnx_status(bundle_dir: Path) -> str:
    o = read_config(bundle_dir).get("onnx") or {}
    return "ok" if o.get("status") == "ok" else f"skipped: {o.get('reason', 'unknown')}"


def _candidates(
    tracker: Tracker,
    *,
    sweep: str | None,
    experiment: str | None,
    run: str | None,
    metric: str,
    mode: str,
    uri: str,
) -> tuple[list[Candidate], str, str | None]:
    """Ranked candidates, a description of where they came from, the sweep's parent run."""
    if run:
        try:
            r = tracker.get_run(run)
        except Exception as exc:  # noqa: BLE001 - MlflowException: RESOURCE_DOES_NOT_EXIST
            raise UserError(
                f"--run: no MLflow run {run!r} at {uri} ({str(exc).splitlines()[0][:120]})"
            ) from None
        c = Candidate.from_run(r)
        what = f"run {run}"
        if not is_finished(c):
            raise UserError(f"--run: run {run} has not finished (status {c.state})")
        if metric not in c.metrics:
            raise UserError(
                f"--metric: run {run} has no metric {metric!r} (it logs: "
                f"{', '.join(sorted(c.metrics)[:12]) or 'no metrics'})"
            )
        if not math.isfinite(c.metrics[metric]):
            raise UserError(f"--metric: run {run} has {metric} = NaN")
        return [c], what, None
    if sweep:
        parent = tracker.find_run(SWEEP_EXPERIMENT, SWEEP_TAG, sweep)
        if parent is None:
            raise UserError(
                f"--sweep: no sweep named {sweep!r} in MLflow experiment "
                f"{SWEEP_EXPERIMENT} at {uri}"
            )
        exp_id = tracker.experiment_of(parent)
        children = [
            Candidate.from_run(r)
            for r in tracker.search_all_runs([exp_id], tracking.sweep_filter(parent))
        ]
        what = f"sweep {sweep}"
        if not children:
            raise UserError(f"--sweep: sweep {sweep!r} has no trials yet (parent run {parent})")
        return choose(children, metric, mode, what), what, parent
    exp = tracker.get_experiment_by_name(experiment) if experiment else None
    if exp is None or exp.lifecycle_stage == "deleted":
        raise UserError(f"--experiment: no MLflow experiment named {experiment!r} at {uri}")
    runs = [Candidate.from_run(r) for r in tracker.search_all_runs([exp.experiment_id])]
    runs = [c for c in runs if SWEEP_TAG not in c.tags]  # sweep parents hold no model
    what = f"experiment {experiment}"
    if not runs:
        raise UserError(f"--experiment: experiment {experiment!r} has no runs")
    return choose(runs, metric, mode, what), what, None


def _checkpoint_artifact(tracker: Tracker, run_id: str) -> str | None:
    """Path of the run's best checkpoint artifact (``checkpoints/best.pt`` preferred)."""
    try:
        items = tracker.list_artifacts(run_id, CHECKPOINTS_DIR)
    except Exception:  # noqa: BLE001 - no artifact folder at all
        return None
    names = [a.path for a in items if not a.is_dir]
    return next((n for n in names if n.endswith(BEST_CHECKPOINT)), None) or next(
        (n for n in names if n.endswith(CHECKPOINT_SUFFIXES)), None
    )


def _with_checkpoints(
    tracker: Tracker, ranked: list[Candidate], what: str, metric: str, k: int
) -> tuple[list[tuple[Candidate, str]], list[str]]:
    """The ``k`` best candidates that have a checkpoint artifact (with its name), best first,
    and the better ones passed over for lacking one; `UserError` when fewer than ``k``."""
    picked: list[tuple[Candidate, str]] = []
    skipped: list[str] = []
    for c in ranked:
        name = _checkpoint_artifact(tracker, c.run_id)
        if name is not None:
            picked.append((c, name))
            if len(picked) == k:
                return picked, skipped
            continue
        skipped.append(f"run {c.run_id} ({metric} {c.metrics[metric]:.4f}): no checkpoint artifact")
    if not picked:
        raise UserError(
            f"{what}: no candidate run has a checkpoint artifact under "
            f"checkpoints/ ({len(ranked)} checked)"
        )
    raise UserError(
        f"--top-k {k}: {what} has only {len(picked)} candidate run(s) with a "
        f"checkpoint ({len(ranked)} finished run(s) report {metric}); pass --top-k "
        f"{len(picked)} or less"
    )


def _champion_value(tracker: Tracker, version: ModelVersion, metric: str) -> float | None:
    """The champion's ``metric``: from its version tags when exported for that metric, else
    from its run (not for an ensemble: its best member's run does not hold the ensemble's
    figure)."""
    tags = dict(version.tags or {})
    if tags.get(METRIC_TAG) == metric and METRIC_VALUE_TAG in tags:
        try:
            return float(tags[METRIC_VALUE_TAG])
        except ValueError:
            pass
    if version.run_id and not tags.get(MEMBERS_TAG):
        try:
            run = tracker.get_run(version.run_id)
        except Exception:  # noqa: BLE001 - the champion's run may have been deleted
            return None
        v = run.data.metrics.get(metric)
        return None if v is None else float(v)
    return None


def _load_candidate(
    tracker: Tracker, c: Candidate, ckpt_name: str, store: str | os.PathLike | Store | None
) -> tuple[LoadedModel, str]:
    """Download the run's checkpoint and load it (CPU); the threshold's source in words."""
    tag_store = c.tags.get(STORE_TAG)
    if store is None and tag_store and Path(tag_store).exists():
        store = tag_store
    with tempfile.TemporaryDirectory(prefix="vfsearch-export-ckpt-") as dst:
        local = tracker.download_artifacts(c.run_id, ckpt_name, dst)
        loaded = load_checkpoint(local, device="cpu", store=store)
    loaded.run_id = c.run_id
    loaded.source = f"run {c.run_id} ({ckpt_name})"
    if loaded.threshold is not None:
        source = "checkpoint (chosen on validation)"
    elif c.value(THRESHOLD_METRIC) is not None and math.isfinite(c.metrics[THRESHOLD_METRIC]):
        loaded.threshold = float(c.metrics[THRESHOLD_METRIC])
        source = "run metric val_threshold3d (fused 3D Dice on validation)"
    elif EVAL_THRESHOLD_TAG.format(split="val") in c.tags:
        loaded.threshold = float(c.tags[EVAL_THRESHOLD_TAG.format(split="val")])
        source = "vfsearch evaluate --split val"
    else:
        source = "none recorded (predict uses 0.5)"
    return loaded, source


def _sweep_info(tracker: Tracker, c: Candidate, parent: str | None) -> dict[str, Any]:
    """Name, parent run id, search-space text and tags of the sweep the run belongs to."""
    parent = parent or c.tags.get(PARENT_RUN_TAG)
    if not parent:
        return {}
    try:
        prun = tracker.get_run(parent)
    except Exception:  # noqa: BLE001 - parent deleted: the card says less
        return {}
    if SWEEP_TAG not in prun.data.tags:
        return {}
    info: dict[str, Any] = {
        "name": prun.data.tags[SWEEP_TAG],
        "run_id": parent,
        "trial_id": c.tags.get(TRIAL_TAG),
        "space_file": prun.data.tags.get(SPACE_FILE_TAG),
        "params": dict(prun.data.params),
        "best_trial": prun.data.tags.get(BEST_TRIAL_TAG),
    }
    try:
        items = tracker.list_artifacts(parent, SEARCH_SPACE_DIR)
        files = [a.path for a in items if not a.is_dir]
        if files:
            with tempfile.TemporaryDirectory() as tmp:
                local = tracker.download_artifacts(parent, files[0], tmp)
                info["space_text"] = Path(local).read_text()[:20000]
    except Exception:  # noqa: BLE001, S110 - the search space is a nice-to-have in the card
        pass
    return info


# -- the model card ----------------------------------------------------------------------


def _metric_rows(metrics: Mapping[str, float], prefix: str) -> list[str]:
    """Table rows ``| name | value | 95% CI |`` for the ``prefix`` metrics (CI folded in)."""
    rows = []
    names = sorted(
        k
        for k in metrics
        if k.startswith(prefix)
        and not k.endswith((CI_LOW_SUFFIX, CI_HIGH_SUFFIX))
        and k not in (f"{prefix}tp", f"{prefix}fp", f"{prefix}fn")
    )
    for k in names:
        lo, hi = metrics.get(k + CI_LOW_SUFFIX), metrics.get(k + CI_HIGH_SUFFIX)
        ci = f"[{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "-"
        rows.append(f"| `{k}` | {metrics[k]:.4f} | {ci} |")
    return rows


def model_card(
    c: Candidate,
    loaded: LoadedModel,
    *,
    metric: str,
    mode: str,
    what: str,
    name: str,
    alias: str,
    sweep: Mapping[str, Any],
    threshold_source: str,
    tracking_uri: str = "",
) -> str:
    """MODEL_CARD.md text: intended use and limits, model, metrics with intervals, data,
    provenance, search space and hyperparameters."""
    cfg = loaded.config
    m = c.metrics
    value = m[metric]
    lo, hi = m.get(metric + CI_LOW_SUFFIX), m.get(metric + CI_HIGH_SUFFIX)
    ci = (
        f" (95% bootstrap CI [{lo:.4f}, {hi:.4f}])"
        if lo is not None and hi is not None
        else " (no interval logged: run `vfsearch evaluate --split val` for one)"
    )
    val_rows = _metric_rows(m, "val_")
    test_rows = _metric_rows(m, "test_")
    lines = [
        f"# Vertebral fracture segmenter: run `{c.run_name or c.run_id}`",
        "",
        (
            f"Exported by vfsearch {vfsearch.__version__} on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; registered as `{name}` "
            f"(alias `{alias}` when promoted). Selected from {what} by `{metric}` ({mode}): "
            f"**{value:.4f}**{ci}."
        ),
        "",
        *_limits_lines(loaded.threshold, threshold_source),
        "## Model",
        "",
        "| key | value |",
        "| --- | --- |",
        *[f"| `{k}` | `{v}` |" for k, v in sorted(cfg.flatten().items()) if k.startswith("model.")],
        f"| `data.seq_len` | `{cfg.data.seq_len}` |",
        f"| `data.plane` | `{cfg.data.plane}` |",
        f"| `data.patch_size` | `{cfg.data.patch_size}` |",
        "",
        (
            "Files: `weights.pt` (state_dict + config), `model.ts` (TorchScript), `model.onnx` "
            "and `model.pt2` (torch.export; when requested and exported cleanly: `config.json` "
            "says why otherwise). Program input: "
            f"normalised windows (B, {cfg.data.seq_len}, H, W), H and W multiples of "
            f"{2**cfg.model.depth}; output: logits."
        ),
        "",
        "## Metrics",
        "",
        (
            "Validation (fused 3D at the original resolution unless named otherwise; the sweep "
            "ranks on these, so they are optimistic):"
        ),
        "",
        "| metric | value | 95% CI |",
        "| --- | --- | --- |",
        *(val_rows or ["| - | - | - |"]),
        "",
        "Test:",
        "",
        *(
            ["| metric | value | 95% CI |", "| --- | --- | --- |", *test_rows]
            if test_rows
            else [
                (
                    f"Not evaluated on the test split (run `vfsearch evaluate --model {c.run_id} "
                    "--split test`, then export again)."
                )
            ]
        ),
        "",
        *_data_lines(c, loaded),
        "## Provenance",
        "",
        f"- MLflow run `{c.run_id}` (name `{c.run_name}`, experiment {c.experiment_id})"
        + (f" at {tracking_uri}" if tracking_uri else ""),
        f"- Sweep: `{sweep['name']}` (parent run `{sweep['run_id']}`, trial "
        f"`{sweep.get('trial_id')}`, sweep's best trial `{sweep.get('best_trial')}`)"
        if sweep.get("name")
        else "- Sweep: none (a single training run)",
        f"- git commit `{c.tags.get(GIT_COMMIT_TAG, 'unknown')}`",
        (
            f"- Selection: finished runs (trials stopped early only if they report `{metric}`), "
            "NaN skipped, ties to the run that finished first."
        ),
        "",
        *_search_space_lines(sweep),
    ]
    lines += [
        "## Hyperparameters of this run",
        "",
        "| param | value |",
        "| --- | --- |",
        *[f"| `{k}` | `{v}` |" for k, v in sorted(c.params.items())],
        "",
    ]
    return "\n".join(lines)


def ensemble_card(
    members: Sequence[Candidate],
    loaded: Sequence[LoadedModel],
    *,
    metric: str,
    mode: str,
    what: str,
    name: str,
    alias: str,
    sweep: Mapping[str, Any],
    value: float,
    validation: Mapping[str, float],
    threshold: float | None,
    threshold_source: str,
    store: str,
    tracking_uri: str = "",
) -> str:
    """MODEL_CARD.md text of an ensemble (``export --top-k``): what `model_card` says, with a
    row per member, the ensemble's own validation figures and the hyperparameters side by
    side."""
    k = len(members)
    lo, hi = validation.get(metric + CI_LOW_SUFFIX), validation.get(metric + CI_HIGH_SUFFIX)
    ci = f" (95% bootstrap CI [{lo:.4f}, {hi:.4f}])" if lo is not None and hi is not None else ""
    params = sorted({p for c in members for p in c.params})
    differ = [p for p in params if len({c.params.get(p) for c in members}) > 1]
    shared = [p for p in params if p not in differ]
    head = " | ".join(f"member {i}" for i in range(k))
    lines = [
        f"# Vertebral fracture segmenter: ensemble of {k} runs",
        "",
        (
            f"Exported by vfsearch {vfsearch.__version__} on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; registered as `{name}` "
            f"(alias `{alias}` when promoted). The {k} best runs of {what} by `{metric}` "
            f"({mode}); their probability maps are averaged crop by crop. The ensemble's own "
            f"fused `{metric}` on the {ENSEMBLE_SPLIT} split of `{store}`: **{value:.4f}**{ci}, "
            "scored at thresholds cross-fitted on halves of the split (none tuned on the cases "
            "it scores); that value is what the promotion gate compared. The members were ranked "
            "on the same split, so it still favours them."
        ),
        "",
        *_limits_lines(threshold, threshold_source),
        "## Members",
        "",
        f"| # | run | name | plane | temporal | seq_len | `{metric}` | own threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {i} | `{c.run_id}` | `{c.run_name}` | `{lm.plane}` | "
            f"`{lm.config.model.temporal}` | {lm.seq_len} | {c.metrics[metric]:.4f} | "
            f"{_fmt(lm.threshold)} |"
            for i, (c, lm) in enumerate(zip(members, loaded, strict=False))
        ],
        "",
        (
            "Files: `members/<i>/` is a complete single-model bundle of member i (`weights.pt`, "
            "`model.ts`, `model.onnx` when it exports cleanly, its own `config.json` and "
            "threshold); `config.json` at the top lists them with the ensemble's threshold. A "
            "consumer without vfsearch runs each member's program over the slices along its "
            "plane and averages the sigmoids."
        ),
        "",
        "## Metrics",
        "",
        (
            f"The ensemble, fused 3D on {ENSEMBLE_SPLIT} at the original resolution (cross-fitted "
            f"thresholds; `{ENSEMBLE_SPLIT}_dice3d_tuned` is at the deployment threshold "
            "chosen on the same cases, optimistic, for reference):"
        ),
        "",
        "| metric | value | 95% CI |",
        "| --- | --- | --- |",
        *(_metric_rows(validation, f"{ENSEMBLE_SPLIT}_") or ["| - | - | - |"]),
        "",
        (
            "Test: not evaluated (export never reads the test split; run `vfsearch evaluate "
            "--model BUNDLE --split test`)."
        ),
        "",
        *_data_lines(members[0], loaded[0]),
        "## Provenance",
        "",
        *[
            f"- member {i}: MLflow run `{c.run_id}` (name `{c.run_name}`, experiment "
            f"{c.experiment_id}, git commit `{c.tags.get(GIT_COMMIT_TAG, 'unknown')}`)"
            for i, c in enumerate(members)
        ],
        f"- MLflow server: {tracking_uri}" if tracking_uri else "- MLflow server: unknown",
        f"- Sweep: `{sweep['name']}` (parent run `{sweep['run_id']}`, sweep's best trial "
        f"`{sweep.get('best_trial')}`)"
        if sweep.get("name")
        else "- Sweep: none",
        (
            f"- Selection: finished runs (trials stopped early only if they report `{metric}`), "
            "NaN skipped, ties to the run that finished first, runs without a checkpoint passed "
            "over."
        ),
        "",
        *_search_space_lines(sweep),
        "## Hyperparameters of the members",
        "",
    ]
    if differ:
        lines += [
            f"| param | {head} |",
            "| --- |" + " --- |" * k,
            *[
                f"| `{p}` | " + " | ".join(f"`{c.params.get(p, '-')}`" for c in members) + " |"
                for p in differ
            ],
            "",
        ]
    lines += [
        "Shared by every member:" if differ else "Identical for every member:",
        "",
        "| param | value |",
        "| --- | --- |",
        *[f"| `{p}` | `{members[0].params[p]}` |" for p in shared],
        "",
    ]
    return "\n".join(lines)


def _limits_lines(threshold: float | None, threshold_source: str) -> list[str]:
    return [
        "## Intended use and limits",
        "",
        (
            "- **Research use only.** Not a medical device, not validated for diagnosis, triage or "
            "any clinical decision; a clinician must not rely on its output."
        ),
        (
            "- Models trained on the synthetic phantoms of `vfsearch synth` (or on fractures "
            "simulated on real scans) demonstrate the pipeline: their figures say nothing about "
            "real patients, and such models are not clinical tools."
        ),
        (
            "- Input: a thoracolumbar CT in HU with a vertebra label map (VerSe or "
            "TotalSegmentator ids, T4-L5). Output: a fracture probability map on the CT's grid "
            f"(threshold {_fmt(threshold)}, source: {threshold_source})."
        ),
        (
            "- Behaviour outside the training distribution (other scanners, kernels, contrast "
            "phases, implants, children, non-osteoporotic fractures, missing or wrong vertebra "
            "labels) is unknown. Recalibrate the threshold for a new population."
        ),
        "",
    ]


def _data_lines(c: Candidate, loaded: LoadedModel) -> list[str]:
    fp = loaded.fingerprint
    return [
        "## Data",
        "",
        (
            f"- Dataset fingerprint: `{c.tags.get(FINGERPRINT_TAG, 'unknown')}` "
            f"(store `{c.tags.get(STORE_TAG, 'unknown')}`)"
        ),
        (
            f"- Preprocessing: resampled to spacing {tuple(loaded.spacing)} mm (x, y, z), crops of "
            f"each vertebra with a {loaded.margin_mm:g} mm margin"
        ),
        "- Normalisation (HU): clip to [{p0_5}, {p99_5}], minus {mean}, over {std}".format(
            **{k: _fmt(fp.get(k)) for k in ("p0_5", "p99_5", "mean", "std")}
        ),
        "",
    ]


def _search_space_lines(sweep: Mapping[str, Any]) -> list[str]:
    lines = ["## Search space", ""]
    if sweep.get("space_text"):
        return lines + [
            f"`{sweep.get('space_file')}`:",
            "",
            "```yaml",
            sweep["space_text"].rstrip(),
            "```",
            "",
        ]
    return lines + ["Not from a sweep, or the sweep logged no search space.", ""]


__all__ = [
    "Candidate",
    "Decision",
    "ExportSummary",
    "choose",
    "ensemble_card",
    "export",
    "is_finished",
    "model_card",
    "promotion_decision",
    "rank",
]
