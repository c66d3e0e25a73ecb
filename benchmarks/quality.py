"""Quality benchmark: what a user gets from vfsearch, through its own train and evaluate path.

Data (built here, nothing downloaded):

* **phantoms split by seed**: ``vfsearch synth --small`` cases of seed 0 are the train and
  validation cases (the last quarter is val), cases of seed 1 the held-out test cases; one
  store, ingested at 2 mm like the demo's (the split comes from a manifest column);
* **real anatomy**: fractures simulated (``vfsearch synth --background``) into the real CT
  scans of ``../shared/data/real`` (a lumbar crop in VerSe ids, an abdominal CT in
  TotalSegmentator ids), three cases, every one a test case of a second store ingested with
  the same spacing and margin. By default they are never used for training (so
  leave-one-scan-out holds trivially); the intact vertebrae of those scans are the negatives
  of vertebra detection;
* **real training data, leave-one-scan-out** (``--real-train N``): the recipe of a user who
  has healthy scans. Every model is trained once per real scan held out, on the phantoms plus
  N variants with random fractures simulated into each *other* real scan (``vfsearch synth
  --background --variants N``, a quarter of them in val); each fold's model scores only its
  held-out scan's cases, and the real figures pool the folds. The phantom test figure is
  that of the first fold's model (held out: ``tptbox_l3``).

Every model is trained by `vfsearch.pipelines.train.run_training` (Ray Train V2 on a local Ray, the
final fused 3D validation included) and scored by `vfsearch.pipelines.evaluate.evaluate` on the test
split of each store at the threshold chosen on the phantom validation split (stored in the
checkpoint: no test case selects anything). Validation selects the best epoch, the threshold,
and the ensemble's members; test is read here only, once per model.

Reported, per model, on held-out phantoms and on held-out real anatomy: pooled 3D Dice, mean
Dice over fractured vertebrae, vertebra-level PR-AUC and ROC-AUC:

* the plan's ablation: plain U-Net (no attention, no temporal module), attention only,
  attention + ``lstm`` (per spatial position), attention + ``lstm_pooled`` (the pooled FiLM
  variant), attention + ``convlstm``, attention + ``lstm`` + GAN (staged by default: the
  segmenter trains alone for the first half of the epochs);
* the earlier study's baseline: the ``resnet18_classifier`` vertebra PR-AUC on the same cases;
* a top-3 ensemble of the segmenters (members chosen by their honest ``val_dice3d``) against
  the best single one by the same figure;
* gains with paired bootstrap 95 % intervals over test cases: ``temporal_gain`` (attention +
  ``lstm`` minus plain, phantom test), the same on real anatomy, and the GAN's gain.

It also prints the ceiling that the store's spacing sets: the real Dice of a perfect model
on the store's grid (each stored fracture crop mapped back onto its CT and scored).

Usage: ``python benchmarks/quality.py`` (CPU defaults: 64 px, base 8, depth 4, 24 epochs x
512 windows; ``--only`` runs some variants, the classifier always unless ``--no-baselines``,
which also drops the ensemble; ``--compare KEY=VALUE`` adds the plan's model with that
override as a row of its own, and its gain over the plan with the interval),
``--device cuda --patch 128 --base 32 --epochs 30 --windows 4000 --train-cases 64`` on a GPU.
The last line is ``RESULT phantom_dice3d=… real_dice3d=… real_vertebra_auc=… plain_dice3d=…
temporal_gain=… classifier_pr_auc=… ensemble_gain=…`` where the first three are those of the
plan's model (attention + ``lstm``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
# (output name, scan folder, CT, labels, label scheme, fractures)
REAL_CASES = [
    ("real_tptbox_l3", "tptbox_l3", "ct.nii.gz", "vertebrae_verse.nii.gz", "verse", "L3:2:wedge"),
    (
        "real_abdomen_l1",
        "totalseg_abdomen",
        "ct.nii.gz",
        "vertebrae_totalseg.nii.gz",
        "totalsegmentator",
        "L1:2:wedge",
    ),
    (
        "real_abdomen_l2_l4",
        "totalseg_abdomen",
        "ct.nii.gz",
        "vertebrae_totalseg.nii.gz",
        "totalsegmentator",
        "L2:3:crush,L4:1:biconcave",
    ),  # T12 is cut by the scan's edge
]
# leave-one-scan-out folds of --real-train: the real scan held out -> its test cases
FOLDS = {
    "tptbox_l3": ("real_tptbox_l3",),
    "totalseg_abdomen": ("real_abdomen_l1", "real_abdomen_l2_l4"),
}
ALL_REAL = tuple(case for case, *_ in REAL_CASES)
SCANS = {scan: (ct, labels, scheme) for _, scan, ct, labels, scheme, _ in REAL_CASES}
SPACING = (2.0, 2.0, 2.0)
MARGIN_MM = 6.0
PLAN = "attention+lstm"


def variants() -> dict[str, dict[str, Any]]:
    """The ablation: each a set of config overrides on top of the shared base."""
    return {
        "plain": {"model.attention": False, "model.temporal": "none"},
        "attention": {"model.temporal": "none"},
        PLAN: {"model.temporal": "lstm"},
        "attention+lstm_pooled": {"model.temporal": "lstm_pooled"},
        "attention+convlstm": {"model.temporal": "convlstm"},
        # the product's default staging: the segmenter alone for the first half of the run
        "attention+lstm+gan": {
            "model.temporal": "lstm",
            "model.gan": True,
            "loss.adv_weight": 0.01,
        },
    }


# -- data ------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _manifest_rows(folder: Path) -> list[dict[str, str]]:
    return _read_rows(folder / "manifest.csv")


def _on_background(folder: Path, scan: str, *, fracture: str | None, variants: int = 1) -> None:
    """``synth --background`` of one real scan into ``folder``, unless it is already there."""
    from vfsearch.pipelines.synth import synth_on_background

    if (folder / "manifest.csv").is_file():
        return
    ct, labels, scheme = SCANS[scan]
    synth_on_background(
        REAL / scan / ct,
        REAL / scan / labels,
        folder,
        fracture=fracture,
        seed=0,
        label_scheme=scheme,
        variants=variants,
    )


def phantom_manifest(work: Path, variety: float) -> Path:
    return work / "raw" / (f"phantoms_v{variety:g}.csv" if variety else "phantoms.csv")


def build_data(
    work: Path, *, train_cases: int, test_cases: int, variety: float = 0.0
) -> tuple[Path, Path]:
    """The phantom store (train/val seed 0, test seed 1) and the real-anatomy store (test).

    ``variety`` randomises the training and validation phantoms (`vfsearch synth --variety`);
    the test phantoms stay at variety 0, so the phantom figure stays comparable across runs."""
    from vfsearch.pipelines.ingest import ingest
    from vfsearch.pipelines.synth import synth_dataset

    raw = work / "raw"
    rows = []
    for seed, n in ((0, train_cases), (1, test_cases)):
        v = variety if seed == 0 else 0.0
        folder = raw / (f"phantom_s{seed}" + (f"_v{v:g}" if v else ""))
        if not (folder / "manifest.csv").is_file():
            synth_dataset(
                folder, cases=n, seed=seed, spacing=None, small=True, fracture_rate=0.3, variety=v
            )
        for i, r in enumerate(_manifest_rows(folder)):
            split = "test" if seed == 1 else ("val" if i >= n - max(1, n // 4) else "train")
            rows.append(
                {
                    "case_id": f"s{seed}_{r['case_id']}",
                    "split": split,
                    **{k: f"{folder.name}/{r[k]}" for k in ("ct", "vertebrae", "fracture")},
                }
            )
    _write_manifest(phantom_manifest(work, variety), rows)
    phantoms = work / (f"phantoms_v{variety:g}.zarr" if variety else "phantoms.zarr")
    ingest(phantom_manifest(work, variety), phantoms, spacing=SPACING, margin_mm=MARGIN_MM, seed=0)

    rows = []
    for name, scan, _, _, _, fractures in REAL_CASES:
        folder = raw / name
        _on_background(folder, scan, fracture=fractures)
        r = _manifest_rows(folder)[0]
        rows.append(
            {
                "case_id": name,
                "split": "test",
                **{k: f"{name}/{r[k]}" for k in ("ct", "vertebrae", "fracture")},
            }
        )
    real_manifest = raw / "real.csv"
    _write_manifest(real_manifest, rows)
    real = work / "real.zarr"
    ingest(real_manifest, real, spacing=SPACING, margin_mm=MARGIN_MM, seed=0)
    return phantoms, real


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        columns = ["case_id", "ct", "vertebrae", "fracture", "split", "domain"]
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def build_loso(work: Path, phantoms_manifest: Path, *, variants: int) -> dict[str, Path]:
    """One training store per held-out real scan (leave-one-scan-out).

    Each holds the phantom train/val cases and ``variants`` cases with random fractures
    simulated (`vfsearch synth --background --variants`) into every *other* real scan, the
    last quarter of those in val (so the threshold is chosen partly on real anatomy too).
    The held-out scan's own healthy anatomy is never in its fold's training data."""
    from vfsearch.pipelines.ingest import ingest

    raw = work / "raw"
    phantom_rows = [
        {**r, "domain": "phantom"} for r in _read_rows(phantoms_manifest) if r["split"] != "test"
    ]
    bg_rows: dict[str, list[dict[str, str]]] = {}
    for scan in SCANS:
        folder = raw / f"bg_{scan}_n{variants}"
        _on_background(folder, scan, fracture=None, variants=variants)
        found = _manifest_rows(folder)
        n_val = max(1, len(found) // 4)
        bg_rows[scan] = [
            {
                "case_id": f"bg_{r['case_id']}",
                "split": "val" if i >= len(found) - n_val else "train",
                "domain": "real",
                **{k: f"{folder.name}/{r[k]}" for k in ("ct", "vertebrae", "fracture")},
            }
            for i, r in enumerate(found)
        ]
    stores = {}
    for held_out in FOLDS:
        rows = phantom_rows + [r for scan, rs in bg_rows.items() if scan != held_out for r in rs]
        manifest = raw / f"loso_{held_out}_n{variants}.csv"
        _write_manifest(manifest, rows)
        stores[held_out] = work / f"loso_{held_out}_n{variants}.zarr"
        ingest(manifest, stores[held_out], spacing=SPACING, margin_mm=MARGIN_MM, seed=0)
    return stores


def pooled_report(parts: list[tuple[dict[str, Any], Path, tuple[str, ...]]]) -> dict[str, Any]:
    """One test report from the folds' reports: each fold keeps only its held-out cases.

    ``parts`` holds (report, its per_vertebra.csv, the fold's case ids). Dice from the summed
    counts, mean Dice over fractured vertebrae, vertebra PR/ROC-AUC over the pooled scores
    (the folds' models score their own cases; a pooled AUC mixes two calibrations)."""
    from vfsearch.core import metrics3d

    per_case, rows = [], []
    for report, csv_path, cases in parts:
        per_case += [c for c in report.get("per_case", []) if c["case_id"] in cases]
        for r in _read_rows(csv_path):
            if r["case_id"] in cases:
                rows.append(
                    {  # a classifier's rows have a score and no voxel counts
                        "tp": int(r["tp"] or 0),
                        "fp": int(r["fp"] or 0),
                        "fn": int(r["fn"] or 0),
                        "score": float(r["score"]),
                        "gt": r["gt_positive"] == "True",
                    }
                )
    summ = metrics3d.summarize(rows)
    det = metrics3d.detection([r["score"] for r in rows], [r["gt"] for r in rows], 0.5)
    order = [c for _, _, cases in parts for c in cases]
    per_case.sort(key=lambda c: order.index(c["case_id"]))
    nan = float("nan")
    flat = {
        "test_dice3d": summ["pooled_dice"] if per_case else nan,
        "test_dice3d_mean": summ["mean_dice"] if per_case else nan,
        "test_vertebra_pr_auc": det["pr_auc"],
        "test_vertebra_roc_auc": det["roc_auc"],
        "test_vertebra_prevalence": det["prevalence"],
    }
    return {"per_case": per_case, "flat": flat, "cases": order}


def resolution_ceiling(store: Path) -> dict[str, float]:
    """Pooled 3D Dice of a perfect model on the store's grid: each stored fracture crop (the
    training target) mapped back onto its CT through the evaluation's own resampling and
    fusion (`to_ct_grid`, `combine_maps`, threshold 0.5) and scored against the CT's truth.
    What the store's spacing alone costs; per case and ``pooled``."""
    from vfsearch.adapters import volumes as io
    from vfsearch.adapters.store import Store
    from vfsearch.core.geometry import Geometry
    from vfsearch.core.inference import CropMap, combine_maps, to_ct_grid
    from vfsearch.core.metrics3d import counts, overlap
    from vfsearch.pipelines.evaluate import case_truth

    st = Store(store)
    out, total = {}, np.zeros(3)
    for case in st.case_ids("test"):
        truth = case_truth(st, case)
        maps = []
        for vid in st.vertebrae(case):
            perfect = (st.read(case, vid, "fracture") > 0).astype(np.float32)
            geometry = Geometry.from_dict(st.vertebra_attrs(case, vid)["geometry"])
            mapped = to_ct_grid(perfect, geometry, truth.ct_geometry, truth.ct_shape, resampler=io)
            if mapped is not None:
                maps.append(CropMap(vid, *mapped))
        pred = combine_maps(maps, truth.box, "mean", 0.5).result() >= 0.5
        c = np.asarray(counts(pred, truth.fracture), dtype=np.float64)
        c[2] += truth.outside
        out[case] = overlap(*c)["dice"]
        total += c
    out["pooled"] = overlap(*total)["dice"]
    return out


# -- training and evaluation ------------------------------------------------------------------
def train_one(
    name: str, store: Path, flat: dict[str, Any], work: Path, *, gpus: float, cpus: float
) -> tuple[Path, dict[str, float], float]:
    """Fit one model with `run_training`; returns (best.pt, final metrics, seconds)."""
    import torch

    from vfsearch.core.config import Config
    from vfsearch.pipelines.train import run_training

    t0 = time.perf_counter()
    shutil.rmtree(work / "checkpoints" / name, ignore_errors=True)  # a fresh run, never a resume
    summary = run_training(
        store,
        Config.from_flat(flat, source=name),
        name=name,
        storage=work / "checkpoints",
        workers=1,
        gpus_per_worker=gpus,
        cpus_per_worker=cpus,
        mlflow_uri=None,
        progress=False,
    )
    best = Path(summary.checkpoint) / "best.pt"
    state = torch.load(best, map_location="cpu", weights_only=True)
    metrics = {k: float(v) for k, v in summary.metrics.items() if isinstance(v, (int, float))}
    metrics["best_epoch"] = float(state["epoch"])
    return best, metrics, time.perf_counter() - t0


def score(
    models: Any, store: Path, out: Path, *, threshold: float | None, device: str
) -> dict[str, Any]:
    """`vfsearch evaluate` on the store's test split (threshold None: chosen on its val)."""
    from vfsearch.pipelines.evaluate import evaluate

    return evaluate(
        models,
        store,
        split="test",
        out=out,
        threshold=threshold,
        device=device,
        n_boot=1000,
        log_to_run=False,
    )


def figures(report: dict[str, Any]) -> dict[str, float]:
    f = report["flat"]
    keys = {
        "dice3d": "test_dice3d",
        "dice3d_mean": "test_dice3d_mean",
        "pr_auc": "test_vertebra_pr_auc",
        "roc_auc": "test_vertebra_roc_auc",
        "prevalence": "test_vertebra_prevalence",
    }
    return {k: float(f.get(v, float("nan"))) for k, v in keys.items()}


def paired_gain(
    a: dict[str, Any], b: dict[str, Any], *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Pooled 3D Dice of report ``a`` minus that of ``b`` on the same cases, with a paired
    bootstrap 95 % interval (cases resampled with replacement, seeded)."""
    ca = np.array([[c["tp"], c["fp"], c["fn"]] for c in a["per_case"]], float)
    cb = np.array([[c["tp"], c["fp"], c["fn"]] for c in b["per_case"]], float)
    assert [c["case_id"] for c in a["per_case"]] == [c["case_id"] for c in b["per_case"]]

    def dice(c: np.ndarray) -> float:
        tp, fp, fn = c.sum(axis=0)
        return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)

    gain = dice(ca) - dice(cb)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ca), size=(n_boot, len(ca)))
    boots = np.array([dice(ca[i]) - dice(cb[i]) for i in idx])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(gain), float(lo), float(hi)


def _row(name: str, ph: dict[str, float], re: dict[str, float], extra: str = "") -> str:
    def f(v: float) -> str:
        return "  n/a" if not np.isfinite(v) else f"{v:5.3f}"

    return (
        f"{name:<22}{f(ph['dice3d']):>7}{f(ph['dice3d_mean']):>7}{f(ph['pr_auc']):>7}"
        f"{f(ph['roc_auc']):>7}  |{f(re['dice3d']):>7}{f(re['dice3d_mean']):>7}"
        f"{f(re['pr_auc']):>7}{f(re['roc_auc']):>7}  {extra}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="working folder (default: a fresh temporary one, removed after)",
    )
    parser.add_argument(
        "--train-cases", type=int, default=16, help="seed-0 phantoms (a quarter of them validation)"
    )
    parser.add_argument("--test-cases", type=int, default=6, help="seed-1 phantoms (test)")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--windows", type=int, default=512, help="training windows per epoch")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--base", type=int, default=8, help="model.base_channels")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per training)")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs per training worker")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument(
        "--variety",
        type=float,
        default=0.0,
        help="randomise the training phantoms (synth --variety, 0-1); test phantoms stay at 0",
    )
    parser.add_argument(
        "--real-train",
        type=int,
        default=0,
        metavar="N",
        help="leave-one-scan-out: also train on N variants with random fractures simulated "
        "into each other real scan (synth --background --variants N); 0: phantoms only",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra config override for every model, key=value",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"also train {PLAN} with this override (a row '{PLAN}+KEY=VALUE') and report its "
        "gain over the plan with a paired interval; repeatable",
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the resnet18 classifier and the ensemble (their RESULT keys are nan)",
    )
    args = parser.parse_args(argv)
    if not REAL.is_dir():
        print(f"real CT samples not found at {REAL}", file=sys.stderr)
        return 2

    import tempfile

    import ray

    from vfsearch.adapters.ray_runtime import start_local_ray
    from vfsearch.core.config import Config, parse_overrides
    from vfsearch.core.errors import UserError

    # a row per --compare, named without '=' (it names folders and runs); parsed before
    # anything is built, so a bad override stops at once
    compared = {f"{PLAN}+{item.replace('=', '-')}": item for item in args.compare}
    try:
        compared_flat = {
            name: parse_overrides([item], source="--compare") for name, item in compared.items()
        }
        for extra in [parse_overrides(args.set), *compared_flat.values()]:
            Config.from_flat(extra, source="--set/--compare")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="vfsearch-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    phantoms, real = build_data(
        work, train_cases=args.train_cases, test_cases=args.test_cases, variety=args.variety
    )
    print(f"data ready in {time.perf_counter() - t_start:.0f} s: {phantoms}, {real}", flush=True)
    ceiling = resolution_ceiling(real)
    print(
        f"ceiling at the store's spacing (a perfect model): real Dice {ceiling['pooled']:.3f} ("
        + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items() if k != "pooled")
        + ")",
        flush=True,
    )

    base = {
        "data.patch_size": args.patch,
        "model.base_channels": args.base,
        "model.depth": args.depth,
        "model.norm": "group",
        "data.augment": 0.5,
        "train.batch_size": args.batch,
        "train.max_windows_per_epoch": args.windows,
        "train.epochs": args.epochs,
        "train.warmup_epochs": 1,
        "train.lr": 2e-3,
        "train.log_pictures": False,
        "train.seed": 0,
        **parse_overrides(args.set),
    }
    gpus = 1.0 if args.device == "cuda" else 0.0
    start_local_ray(
        num_cpus=max(2, int(args.cpus)), num_gpus=int(gpus) or None, log_to_driver=False
    )
    chosen = [v for v in args.only.split(",") if v]
    todo = {k: v for k, v in variants().items() if not chosen or k in chosen}
    for name, extra in compared_flat.items():
        todo[name] = {**variants()[PLAN], **extra}
    if compared and PLAN not in todo:
        todo = {PLAN: variants()[PLAN], **todo}
    val: dict[str, dict[str, float]] = {}
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    train_s: dict[str, float] = {}
    # folds: (training store, the real test cases its models score); one fold without
    # --real-train (phantoms only: every real case is unseen), else one per held-out scan
    folds: dict[str, tuple[Path, tuple[str, ...]]] = {"": (phantoms, ALL_REAL)}
    if args.real_train:
        stores = build_loso(work, phantom_manifest(work, args.variety), variants=args.real_train)
        folds = {scan: (stores[scan], FOLDS[scan]) for scan in FOLDS}
        print(f"leave-one-scan-out stores ready: {', '.join(map(str, stores.values()))}")

    def fit_and_score(name: str, flat: dict[str, Any]) -> None:
        """Train ``name`` once per fold; phantom test by the first fold's model, real test
        pooled over the folds (each fold's model scores its held-out scan's cases)."""
        parts = []
        for i, (fold, (store, cases)) in enumerate(folds.items()):
            key = f"{name}@{fold}" if fold else name
            ckpt, metrics, seconds = train_one(key, store, flat, work, gpus=gpus, cpus=args.cpus)
            fold_ckpts.setdefault(fold, {})[name] = ckpt
            fold_val.setdefault(fold, {})[name] = metrics
            train_s[name] = train_s.get(name, 0.0) + seconds
            # a segmenter's threshold was chosen on its fold's val by training; the
            # classifier's is chosen on the phantom val by the first fold's evaluation
            threshold = None if name == cls_name else metrics.get("val_threshold3d")
            if i == 0:
                val[name] = metrics
                ph = score(
                    ckpt,
                    phantoms,
                    work / "eval" / name / "phantom",
                    threshold=threshold,
                    device=args.device,
                )
                if threshold is None:
                    threshold = min(max(float(ph["threshold"]), 1e-3), 0.999)
                reports[name] = {"phantom": ph, "phantom_threshold": threshold}
            elif threshold is None:
                threshold = reports[name]["phantom_threshold"]
            out = work / "eval" / name / (f"real_{fold}" if fold else "real")
            re = score(ckpt, real, out, threshold=threshold, device=args.device)
            parts.append((re, out / "per_vertebra.csv", cases))
        reports[name]["real"] = pooled_report(parts) if args.real_train else parts[0][0]
        print(
            f"{name}: trained in {train_s[name]:.0f} s (best epoch "
            f"{val[name]['best_epoch']:.0f}, val_dice3d {val[name].get('val_dice3d', 0):.3f}"
            f"), phantom test Dice {figures(reports[name]['phantom'])['dice3d']:.3f}, "
            f"real test Dice {figures(reports[name]['real'])['dice3d']:.3f}, real vertebra "
            f"ROC-AUC {figures(reports[name]['real'])['roc_auc']:.3f}",
            flush=True,
        )

    cls_name = "resnet18_classifier"
    fold_ckpts: dict[str, dict[str, Path]] = {}
    fold_val: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for name, overrides in todo.items():
            fit_and_score(name, {**base, **overrides})
        seg_names = list(reports)
        if not args.no_baselines:
            # the earlier study's baseline: the slice classifier, vertebra score = max slice
            fit_and_score(cls_name, {**base, "model.family": cls_name, "model.norm": "batch"})

        # top-3 ensemble per fold, members chosen on the fold's honest val_dice3d; threshold
        # chosen on the phantom val (first fold), phantom test by the first fold's ensemble
        ranked = sorted(seg_names, key=lambda k: -val[k].get("val_dice3d", -1.0))
        members = ranked[:3]
        parts = []
        ens_ph: dict[str, Any] = {}
        ens_re: dict[str, Any] = {}
        ensemble_folds = {} if args.no_baselines else folds
        for i, (fold, (_, cases)) in enumerate(ensemble_folds.items()):
            fv = fold_val[fold]
            fold_members = sorted(seg_names, key=lambda k: -fv[k].get("val_dice3d", -1.0))[:3]
            paths = [str(fold_ckpts[fold][m]) for m in fold_members]
            if i == 0:
                ens_ph = score(
                    paths,
                    phantoms,
                    work / "eval" / "ensemble" / "phantom",
                    threshold=None,
                    device=args.device,
                )
            out = work / "eval" / "ensemble" / (f"real_{fold}" if fold else "real")
            re = score(paths, real, out, threshold=float(ens_ph["threshold"]), device=args.device)
            parts.append((re, out / "per_vertebra.csv", cases))
        if parts:
            ens_re = pooled_report(parts) if args.real_train else parts[0][0]
    finally:
        ray.shutdown()

    print(
        f"\nheld-out test cases: {len(reports[next(iter(reports))]['phantom']['cases'])} "
        f"phantoms (seed 1), {len(REAL_CASES)} real scans with simulated fractures; "
        f"{args.train_cases} seed-0 phantoms for train+val; model {args.patch}px, base "
        f"{args.base}, depth {args.depth}, {args.epochs} epochs x {args.windows} windows"
    )
    print(f"{'':<22}{'phantom test':^28}  |{'real anatomy test':^28}")
    print(
        f"{'model':<22}{'Dice':>7}{'mDice':>7}{'PRAUC':>7}{'ROC':>7}  |{'Dice':>7}"
        f"{'mDice':>7}{'PRAUC':>7}{'ROC':>7}  val_dice3d  train s"
    )
    for name in seg_names:
        print(
            _row(
                name,
                figures(reports[name]["phantom"]),
                figures(reports[name]["real"]),
                f"{val[name].get('val_dice3d', float('nan')):9.3f}  {train_s[name]:6.0f}",
            )
        )
    nan = {"dice3d": float("nan"), "dice3d_mean": float("nan")}
    cls_pr_auc = float("nan")
    if not args.no_baselines:
        cls_ph, cls_re = reports[cls_name]["phantom"], reports[cls_name]["real"]
        cls_pr_auc = figures(cls_re)["pr_auc"]
        members_text = "members " + ", ".join(members)
        print(_row("ensemble top-3", figures(ens_ph), figures(ens_re), members_text))
        print(
            _row(
                cls_name,
                {**nan, **figures(cls_ph)},
                {**nan, **figures(cls_re)},
                f"{'':9}  {train_s[cls_name]:6.0f}",
            )
        )
        print(
            f"vertebra prevalence (PR-AUC floor): phantom "
            f"{figures(cls_ph)['prevalence']:.3f}, real {figures(cls_re)['prevalence']:.3f}"
        )

    gains: dict[str, tuple[float, float, float]] = {}
    if PLAN in reports and "plain" in reports:
        gains["temporal_gain"] = paired_gain(reports[PLAN]["phantom"], reports["plain"]["phantom"])
        gains["real_temporal_gain"] = paired_gain(reports[PLAN]["real"], reports["plain"]["real"])
    if "attention+lstm+gan" in reports and PLAN in reports:
        gains["gan_gain"] = paired_gain(
            reports["attention+lstm+gan"]["phantom"], reports[PLAN]["phantom"]
        )
        gains["real_gan_gain"] = paired_gain(
            reports["attention+lstm+gan"]["real"], reports[PLAN]["real"]
        )
    for name, item in compared.items():
        gains[f"{item} gain"] = paired_gain(reports[name]["phantom"], reports[PLAN]["phantom"])
        gains[f"{item} real_gain"] = paired_gain(reports[name]["real"], reports[PLAN]["real"])
    best_single = ranked[0]
    if not args.no_baselines:
        gains["ensemble_gain"] = paired_gain(ens_ph, reports[best_single]["phantom"])
        gains["real_ensemble_gain"] = paired_gain(ens_re, reports[best_single]["real"])
    for key, (g, lo, hi) in gains.items():
        print(f"{key:<20} {g:+.3f}  95% CI [{lo:+.3f}, {hi:+.3f}]")
    if not args.no_baselines:
        print(f"ensemble against the best single model by val_dice3d ({best_single})")
    wall = time.perf_counter() - t_start
    print(f"wall time {wall / 60:.1f} min")
    summary = {
        "reports": {k: {s: figures(r[s]) for s in ("phantom", "real")} for k, r in reports.items()},
        "real_train": args.real_train,
        "val": val,
        "gains": gains,
        "ensemble_members": members if parts else [],
        "wall_s": wall,
    }
    (work / "quality.json").write_text(json.dumps(summary, indent=2))
    print(f"details: {work / 'quality.json'} and {work / 'eval'}/*/*/metrics.json")

    plan = reports.get(PLAN) or reports[next(iter(reports))]
    result = {
        "phantom_dice3d": figures(plan["phantom"])["dice3d"],
        "real_dice3d": figures(plan["real"])["dice3d"],
        "real_vertebra_auc": figures(plan["real"])["roc_auc"],
        "plain_dice3d": figures(reports["plain"]["phantom"])["dice3d"]
        if "plain" in reports
        else float("nan"),
        "temporal_gain": gains.get("temporal_gain", (float("nan"),))[0],
        "classifier_pr_auc": cls_pr_auc,
        "ensemble_gain": gains.get("ensemble_gain", (float("nan"),))[0],
    }
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
