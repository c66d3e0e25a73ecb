"""The ``vfsearch`` command line. Each command parses, calls one library function, prints.

Heavy libraries are imported inside the commands, so ``vfsearch --help`` stays fast.
A `UserError` anywhere below becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from vfsearch.adapters import progress
from vfsearch.core.errors import BadValue, UserError

app = typer.Typer(
    name="vfsearch",
    help="Hyperparameter search for vertebral-fracture segmentation in CT "
    "(Attention U-Net + LSTM over slice windows, Ray Tune + Optuna, MLflow).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options several commands share (same name, same meaning, one help text).
LabelSchemeOpt = Annotated[
    str, typer.Option(help="Label ids of --vertebrae: verse or totalsegmentator.")
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        help="Fracture probability threshold (default: the model's validation threshold, else 0.5)."
    ),
]
CombineOpt = Annotated[str, typer.Option(help="Where vertebra crops overlap: mean, max or vote.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Also show Ray's own output: worker and actor logs, Ray's warnings and "
        "Tune's status table (default: only vfsearch's lines, at a terminal).",
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")
]
TrainingStoreOpt = Annotated[
    Path | None,
    typer.Option(
        help="Training store, for a checkpoint that does not carry its spacing and fingerprint."
    ),
]


@app.command()
def synth(
    out: Annotated[
        Path,
        typer.Argument(help="Output folder (created). Holds one folder per case and manifest.csv."),
    ],
    cases: Annotated[int, typer.Option(min=1, help="Number of synthetic cases.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    spacing: Annotated[
        str | None,
        typer.Option(
            help="Voxel spacing x,y,z in mm (default: anisotropic 0.8,0.8,2.0; small: 2,2,2)."
        ),
    ] = None,
    small: Annotated[
        bool, typer.Option("--small", help="Small, coarse volumes for tests and quick demos.")
    ] = False,
    fracture_rate: Annotated[
        float, typer.Option(help="Share of vertebrae fractured (0-1).")
    ] = 0.22,
    variety: Annotated[
        float,
        typer.Option(
            help="Per-case randomisation of scanner and patient, 0-1 (0: the standard phantom, "
            "same bytes; 1: full ranges; between: narrower ranges): spacing (0.6-1.0 mm "
            "in-plane, 1-3 mm slices, unless --spacing is given), noise 5-40 HU and its grain, "
            "trabecular bone 80-300 HU (osteopenic to dense), cortical shell, slice partial "
            "volume, and ribs, aorta and bowel gas (never labelled). Phantoms only."
        ),
    ] = 0.0,
    background: Annotated[
        Path | None,
        typer.Option(
            help="Simulate fractures on real (healthy) scans instead of a phantom: one CT (with "
            "--vertebrae), a folder of scans (<name>/ct.nii.gz + <name>/vertebrae*.nii.gz, or a "
            "VerSe rawdata/derivatives tree) or a manifest CSV (case_id, ct, vertebrae[, "
            "label_scheme][, subject]; paths relative to the CSV)."
        ),
    ] = None,
    vertebrae: Annotated[
        Path | None, typer.Option(help="Vertebra label map of --background when that is one CT.")
    ] = None,
    fracture: Annotated[
        str | None,
        typer.Option(
            help="With --background: vertebrae to fracture as id:grade:morphology, comma "
            "separated (e.g. 22:2:wedge,20:3:crush), one case per scan; default: random "
            "fractures per variant."
        ),
    ] = None,
    variants: Annotated[
        int,
        typer.Option(
            help="With --background: cases per scan (<scan>_v000, ...), each with 0-3 random "
            "fractures of fully imaged vertebrae T4-L5 (about 20 % none)."
        ),
    ] = 1,
    label_scheme: LabelSchemeOpt = "verse",
) -> None:
    """Write synthetic thoracolumbar CT (T4-L5) with vertebra labels and fracture masks.

    Each case gets ct.nii.gz, vertebrae.nii.gz (VerSe ids 11-24), fracture.nii.gz (the
    deformed endplate zone and its sclerotic band) and meta.json (grade, morphology and
    measured height ratio per vertebra). With --background, fractures are simulated on
    real scans instead (N --variants per scan, manifest with a subject column); a vertebra
    cut by the scan's edge is never fractured.
    """
    from vfsearch.pipelines import synth as synth_mod

    with _errors():
        if (
            background is None
            and vertebrae is None
            and (fracture is not None or label_scheme != "verse" or variants != 1)
        ):
            raise UserError("--fracture/--label-scheme/--variants: only with --background")
        if variety != 0 and (background is not None or vertebrae is not None):
            raise UserError("--variety: only for phantoms, not with --background")
        if background is not None or vertebrae is not None:
            result = synth_mod.synth_on_background(
                background,
                vertebrae,
                out,
                fracture=fracture,
                seed=seed,
                label_scheme=label_scheme,
                variants=variants,
                warn=lambda line: typer.echo(f"warning: {line}", err=True),
            )
        else:
            result = synth_mod.synth_dataset(
                out,
                cases=cases,
                seed=seed,
                spacing=_parse_spacing(spacing, "--spacing"),
                small=small,
                fracture_rate=fracture_rate,
                variety=variety,
            )
    typer.echo(result)


@app.command()
def ingest(
    source: Annotated[
        Path,
        typer.Argument(
            help="A manifest CSV (case_id, ct, vertebrae, "
            "fracture[, split, subject, grades, domain]), a synth folder or a "
            "VerSe tree. `vertebrae` may name a label map or a "
            "CSV of boxes vertebra,x0,y0,z0,x1,y1,z1."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Zarr store to create or extend.")],
    spacing: Annotated[str, typer.Option(help="Resampling spacing x,y,z in mm.")] = "1,1,1",
    margin: Annotated[float, typer.Option(help="Crop margin around each vertebra, mm.")] = 8.0,
    label_scheme: Annotated[
        str, typer.Option(help="Vertebra ids of the label maps: verse or totalsegmentator.")
    ] = "verse",
    split: Annotated[
        str, typer.Option(help="train,val,test fractions for cases without a split column.")
    ] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="Seed of the case-level split.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Cases ingested in parallel.")] = 1,
    chunk_plane: Annotated[
        str,
        typer.Option(
            help="Plane whose consecutive slices share chunks (the training plane): "
            "sagittal, coronal or axial."
        ),
    ] = "sagittal",
) -> None:
    """Ingest CT + vertebra labels (+ fracture masks) into a Zarr store of vertebra crops.

    Reorients to one canonical orientation, resamples, crops each vertebra T4-L5 with a
    margin and stores int16 HU and uint8 masks with the geometry to map back to the scanner.
    Re-running skips finished cases; an interrupted case is redone.
    """
    from vfsearch.pipelines import ingest as ingest_mod

    with _errors():
        summary = ingest_mod.ingest(
            source,
            out,
            spacing=_parse_spacing(spacing, "--spacing"),
            margin_mm=margin,
            label_scheme=label_scheme,
            split=_parse_fractions(split),
            seed=seed,
            workers=workers,
            chunk_plane=chunk_plane,
        )
    typer.echo(summary)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's data and store.")] = Path(
        "demo_out"
    ),
    cases: Annotated[int, typer.Option(min=6, help="Synthetic cases.")] = 12,
    trials: Annotated[int, typer.Option(min=1, help="Trials of the demo sweep.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the main job on embedded defaults: synthetic data, local Ray, local MLflow.

    synth -> ingest -> tune (the packaged space demo) -> export -> evaluate on the held-out
    test cases -> predict and picture a fractured case, in --workdir.
    """
    from vfsearch.pipelines.demo import run_demo

    with _errors():
        run_demo(workdir, cases=cases, trials=trials, seed=seed, echo=typer.echo)


@app.command()
def train(
    store: Annotated[
        Path, typer.Option("--store", help="Zarr store written by `vfsearch ingest`.")
    ],
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML config (nested sections or dotted keys).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set model.depth=3 (repeatable)."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP ranks).")] = 1,
    gpus_per_worker: Annotated[
        float,
        typer.Option(
            min=0, help="GPUs per worker (0: CPU with gloo; > 0: CUDA with NCCL and bf16)."
        ),
    ] = 0.0,
    cpus_per_worker: Annotated[
        float,
        typer.Option(min=0.1, help="CPUs each worker reserves (its loader processes use them)."),
    ] = 1.0,
    loader_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="DataLoader processes per worker; shortcut for --set train.num_workers=N "
            "(default auto: none on CPU, CPUs per worker - 1 up to 8 on GPU).",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Shortcut for --set train.epochs=E.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Run name; the same name continues that run from its last checkpoint."),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)."),
    ] = None,
    workdir: Annotated[
        Path, typer.Option(help="Working folder: embedded MLflow server data and checkpoints.")
    ] = Path("mlruns"),
    storage: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint storage (a path or URI every node reaches; default "
            "<workdir>/checkpoints)."
        ),
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "vfsearch",
    verbose: VerboseOpt = False,
) -> None:
    """Train one model with Ray Train (DDP), validating every epoch, tracked in MLflow.

    Logs to $MLFLOW_TRACKING_URI when set, else to the embedded server of --workdir
    (started once and reused; see `vfsearch ui`).
    """
    from vfsearch.core.config import load_config
    from vfsearch.pipelines.train import train as train_fn

    with _errors():
        overrides = list(set_ or [])
        if epochs is not None:
            overrides.append(f"train.epochs={epochs}")
        if loader_workers is not None:
            overrides.append(f"train.num_workers={loader_workers}")
        cfg = load_config(str(config) if config else None, overrides)
        summary = train_fn(
            store,
            cfg,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            name=name,
            address=address,
            storage=storage,
            workdir=workdir,
            experiment=experiment,
            config_file=config,
            verbose=verbose,
            echo=progress.say,
        )
    typer.echo(summary)


@app.command()
def ui(
    workdir: Annotated[
        Path, typer.Option(help="Working folder of the embedded MLflow server.")
    ] = Path("mlruns"),
    port: Annotated[
        int,
        typer.Option(
            help="Port for a server started now (0: $VFSEARCH_MLFLOW_PORT or a free one)."
        ),
    ] = 0,
    dashboard_port: Annotated[
        int,
        typer.Option(
            help="Port for an Optuna dashboard started now (0: $VFSEARCH_OPTUNA_PORT or a free "
            "one)."
        ),
    ] = 0,
    sweep: Annotated[
        str | None,
        typer.Option(
            "--sweep",
            help="Also print this sweep's links: its trials in MLflow (best first by "
            "the sweep metric) and its study in the Optuna dashboard.",
        ),
    ] = None,
    stop: Annotated[
        bool,
        typer.Option("--stop", help="Stop the embedded MLflow server and the Optuna dashboard."),
    ] = False,
) -> None:
    """Start (or find) the MLflow server and the Optuna dashboard; print the URLs to open.

    The dashboard shows the Optuna studies of --workdir (optuna.db). Both run detached and
    are found again by later commands; --stop stops both (their data stays).
    """
    from vfsearch.pipelines import report as report_mod

    with _errors():
        if stop:
            typer.echo(report_mod.stop_ui(workdir))
            return
        links = report_mod.ui(
            workdir, port=port or None, dashboard_port=dashboard_port or None, sweep=sweep
        )
    typer.echo(str(links))


@app.command()
def report(
    sweep: Annotated[str, typer.Option("--sweep", help="Sweep name (as given to tune).")],
    out: Annotated[
        Path, typer.Option("--out", help="HTML file to write (one self-contained page).")
    ] = Path("report.html"),
    workdir: Annotated[
        Path, typer.Option(help="Folder of the embedded MLflow server and the Optuna study.")
    ] = Path("mlruns"),
) -> None:
    """Write a shareable report of a sweep: one self-contained HTML page.

    Ranked trials, Optuna's figures (history, importances, parallel coordinates, contour),
    the best trial's curves, heatmaps, attention maps and 3D rendering, and the promotion
    decision. Also logged on the sweep's MLflow parent run (report/).
    """
    from vfsearch.pipelines import report as report_mod

    with _errors():
        summary = report_mod.write_report(sweep, out, workdir=workdir)
    typer.echo(str(summary))


@app.command()
def predict(
    ct: Annotated[
        Path, typer.Argument(help="CT: NIfTI, MHA/MHD, NRRD file or a DICOM series folder.")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Checkpoint file or folder, or MLflow run id; comma-separated "
            "models of different planes are averaged.",
        ),
    ],
    vertebrae: Annotated[
        Path,
        typer.Option("--vertebrae", help="Vertebra label map of the CT (or a bounding-box CSV)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (created).")],
    label_scheme: LabelSchemeOpt = "verse",
    threshold: ThresholdOpt = None,
    combine: CombineOpt = "mean",
    device: DeviceOpt = None,
    store: TrainingStoreOpt = None,
    workdir: Annotated[
        Path, typer.Option(help="Working folder of the embedded MLflow server (for run ids).")
    ] = Path("mlruns"),
) -> None:
    """Predict the fracture map of one CT, on the CT's own grid.

    Writes fracture_prob.nii.gz, fracture_mask.nii.gz, segmentation.seg.nrrd (opens in 3D
    Slicer: a named segment per vertebra and a red "fracture") and vertebrae.json (score and
    fracture volume per vertebra) in --out, on the CT's own grid.
    """
    from vfsearch.pipelines import predict as predict_mod

    with _errors():
        summary = predict_mod.predict(
            model,
            ct,
            vertebrae,
            out,
            label_scheme=label_scheme,
            threshold=threshold,
            combine=combine,
            device=device,
            store=store,
            workdir=workdir,
        )
    typer.echo(predict_mod.format_summary(summary))


@app.command()
def evaluate(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Checkpoint file or folder, or MLflow run id (a segmenter or the "
            "resnet18_classifier baseline).",
        ),
    ],
    store: Annotated[
        Path, typer.Option("--store", help="Zarr store written by `vfsearch ingest`.")
    ],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    out: Annotated[
        Path, typer.Option("--out", help="Folder for metrics.json and per_vertebra.csv.")
    ] = Path("evaluation"),
    threshold: Annotated[
        float | None,
        typer.Option(help="Fixed threshold (default: chosen on the validation split)."),
    ] = None,
    combine: CombineOpt = "mean",
    hd95: Annotated[
        bool,
        typer.Option("--hd95", help="Also the 95% Hausdorff distance (mm) per fractured vertebra."),
    ] = False,
    device: DeviceOpt = None,
    workdir: Annotated[
        Path, typer.Option(help="Working folder of the embedded MLflow server (run ids, logging).")
    ] = Path("mlruns"),
) -> None:
    """Fused 3D evaluation of a model on a split of a store.

    Per vertebra, per case and pooled Dice/IoU/precision/recall at
    the original resolution, 2D slice figures, vertebra detection (PR-AUC with prevalence,
    ROC-AUC, sensitivity, specificity) and bootstrap 95% intervals. Writes metrics.json and
    per_vertebra.csv; logs to the MLflow run when --model is a run id.
    """
    from vfsearch.pipelines import evaluate as evaluate_mod

    with _errors():
        report = evaluate_mod.evaluate(
            model,
            store,
            split=split,
            out=out,
            threshold=threshold,
            combine=combine,
            hd95=hd95,
            device=device,
            workdir=workdir,
            echo=progress.say,
        )
    typer.echo(evaluate_mod.format_report(report))


@app.command()
def tune(
    store: Annotated[Path, typer.Option("--store", help="Zarr store written by ingest.")],
    space: Annotated[
        Path,
        typer.Option(
            "--space",
            help="Search space: a packaged name "
            "(default, real, gan, ablation, pareto, demo, smoke) "
            "or a YAML file (schema in the README).",
        ),
    ],
    num_samples: Annotated[int, typer.Option(help="Number of trials.")] = 4,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)."),
    ] = None,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs per trial (all workers).")] = 0.0,
    workers_per_trial: Annotated[int, typer.Option(help="Ray Train workers per trial.")] = 1,
    cpus_per_worker: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="CPUs each Ray Train worker reserves; its DataLoader processes "
            "(train.num_workers in the space, default auto) use them.",
        ),
    ] = 1.0,
    max_concurrent: Annotated[
        int | None,
        typer.Option(
            help="Trials at once (default: what the cluster's resources allow now; on a joined "
            "cluster a higher value lets the autoscaler add nodes)."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Sweep name (default: <space>-s<seed>); reuse it with --resume."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted sweep: finished trials are kept, errored ones resumed.",
        ),
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Ray storage path or URI for checkpoints (default: mlruns/ray_results; on a "
            "cluster use shared storage such as s3://...)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = 0,
    sampler: Annotated[
        str, typer.Option(help="Optuna sampler: tpe, or random (the baseline TPE should beat).")
    ] = "tpe",
    driver_resource: Annotated[
        str | None,
        typer.Option(
            help="Custom Ray resource each trial driver requests instead of CPU, so drivers "
            "stay on the node offering it, e.g. vfsearch_driver on a cluster's head "
            "(default: $VFSEARCH_DRIVER_RESOURCE)."
        ),
    ] = None,
    workdir: Annotated[
        Path, typer.Option(help="Folder of the embedded MLflow server and the Optuna study.")
    ] = Path("mlruns"),
    verbose: VerboseOpt = False,
) -> None:
    """Search hyperparameters: Ray Tune + Optuna (TPE) + ASHA, one MLflow child run per trial.

    Each trial trains one model with Ray Train and ends with the fused 3D validation Dice
    (val_dice3d), which Optuna optimises; ASHA stops weak trials on the per-epoch Dice.
    """
    from vfsearch.pipelines.tune import tune as run_tune

    with _errors():
        summary = run_tune(
            store,
            space,
            num_samples=num_samples,
            address=address,
            gpus_per_trial=gpus_per_trial,
            workers_per_trial=workers_per_trial,
            cpus_per_worker=cpus_per_worker,
            max_concurrent=max_concurrent,
            name=name,
            resume=resume,
            storage=storage,
            seed=seed,
            workdir=workdir,
            sampler=sampler,
            driver_resource=driver_resource,
            verbose=verbose,
            echo=progress.say,
        )
    typer.echo(str(summary))


@app.command()
def visualize(
    out: Annotated[Path, typer.Option("--out", help="Output folder (created).")],
    ct: Annotated[
        Path | None,
        typer.Argument(
            help="CT: NIfTI, MHA/MHD, NRRD file or a DICOM series folder (omit with --run only)."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Checkpoint file or folder, or MLflow run id; comma-separated "
            "models of different planes are averaged.",
        ),
    ] = None,
    vertebrae: Annotated[
        Path | None,
        typer.Option("--vertebrae", help="Vertebra label map of the CT (or a bounding-box CSV)."),
    ] = None,
    fracture: Annotated[
        Path | None,
        typer.Option(
            "--fracture", help="Ground-truth fracture mask on the CT's grid (drawn as a contour)."
        ),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="MLflow run id: its training curves; for a sweep's parent run also "
            "Dice against budget and the parameter importances.",
        ),
    ] = None,
    label_scheme: LabelSchemeOpt = "verse",
    threshold: ThresholdOpt = None,
    combine: CombineOpt = "mean",
    html: Annotated[
        bool, typer.Option("--html", help="Also an interactive, self-contained view_3d.html.")
    ] = False,
    log_to: Annotated[
        str | None, typer.Option("--log-to", help="Also log the case pictures on this MLflow run.")
    ] = None,
    device: DeviceOpt = None,
    store: TrainingStoreOpt = None,
    workdir: Annotated[
        Path, typer.Option(help="Working folder of the embedded MLflow server (run ids).")
    ] = Path("mlruns"),
) -> None:
    """Pictures of a model on one CT: heatmaps, attention maps, 3D renders, curves.

    Heatmap overlays and attention-gate maps through each
    vertebra with a predicted or true fracture (heatmap_*.png, attention_*.png), the spine
    and fracture surfaces as STL/PLY for 3D Slicer and a 4-view rendering (render_3d.png);
    with --run, training / sweep curves from MLflow.
    """
    from vfsearch.pipelines import visualize as visualize_mod

    with _errors():
        summary = visualize_mod.visualize(
            out,
            model=model,
            ct=ct,
            vertebrae=vertebrae,
            fracture=fracture,
            run=run,
            label_scheme=label_scheme,
            threshold=threshold,
            combine=combine,
            device=device,
            store=store,
            workdir=workdir,
            html=html,
            log_to=log_to,
        )
    typer.echo(visualize_mod.format_summary(summary))


@app.command()
def export(
    sweep: Annotated[
        str | None, typer.Option("--sweep", help="Pick the best finished trial of this sweep.")
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", help="Pick the best finished run of this MLflow experiment."),
    ] = None,
    run: Annotated[str | None, typer.Option("--run", help="Export this MLflow run id.")] = None,
    metric: Annotated[
        str, typer.Option(help="Metric that ranks runs and gates promotion.")
    ] = "val_dice3d",
    mode: Annotated[str, typer.Option(help="max (higher is better) or min.")] = "max",
    name: Annotated[str, typer.Option(help="Registered model name.")] = "vfsearch-fracture",
    alias: Annotated[str, typer.Option(help="Alias moved to the new version.")] = "champion",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Bundle folder: TorchScript (+ ONNX), config.json, MODEL_CARD.md."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Move the alias even if the challenger does not beat the champion."
        ),
    ] = False,
    minimum: Annotated[
        float | None,
        typer.Option(
            "--min",
            help="Also require the lower bound of the metric's 95% interval "
            "(<metric>_ci_low, from vfsearch evaluate) to beat this value.",
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            help="Training store, for a checkpoint that does not carry its spacing and "
            "fingerprint; with --top-k above 1, its val split judges the ensemble (default: the "
            "runs' store tag)."
        ),
    ] = None,
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            help="Export the K best runs as one ensemble that averages their maps, "
            "gated on its own fused val Dice on --store's val split (1: the best run alone).",
        ),
    ] = 1,
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx/--no-onnx",
            help="Also export ONNX (checked with onnxruntime; skipped with a reason if it fails).",
        ),
    ] = True,
    torch_export: Annotated[
        bool,
        typer.Option(
            "--torch-export",
            help="Also write model.pt2, a torch.export program (slower to "
            "produce; the successor of TorchScript).",
        ),
    ] = False,
    workdir: Annotated[
        Path, typer.Option(help="Working folder of the embedded MLflow server.")
    ] = Path("mlruns"),
) -> None:
    """Promote the best trained model to the MLflow registry and write a bundle.

    Registers it in the MLflow Model Registry (pyfunc
    flavour, signature, input example), point --alias at it if it beats the current
    champion, and write a self-contained bundle to --out. Re-exporting a run is idempotent.
    With --top-k K the K best runs become one ensemble, judged by its own validation Dice.
    """
    from vfsearch.pipelines.export import export as export_fn

    with _errors():
        summary = export_fn(
            sweep=sweep,
            experiment=experiment,
            run=run,
            metric=metric,
            mode=mode,
            name=name,
            alias=alias,
            out=out,
            force=force,
            minimum=minimum,
            store=store,
            top_k=top_k,
            onnx=onnx,
            torch_export=torch_export,
            workdir=workdir,
            echo=typer.echo,
        )
    typer.echo(str(summary))


def _parse_spacing(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option}: expected three numbers x,y,z in mm, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise UserError(f"{option}: expected three positive numbers x,y,z in mm, got {text!r}")
    return values


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise UserError(f"--split: expected train,val,test fractions summing to 1, got {text!r}")
    return values


class _errors:
    """Turn `UserError` into one line on stderr and exit code 2."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> Literal[False]:
        if isinstance(exc, BadValue):  # pure code names the parameter; here it is an option
            typer.echo(f"error: {exc.as_option()}", err=True)
            raise typer.Exit(code=2)
        if isinstance(exc, UserError):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2)
        return False


def _tolerant_streams() -> None:
    """Never die printing: under an ASCII locale (a bare CI box, ``LC_ALL=C``) a library's
    emoji or box drawing (MLflow's run links, Ray Tune's tables) is escaped instead of
    raising UnicodeEncodeError at the end of a finished sweep."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main() -> None:
    _tolerant_streams()
    try:
        app()
    except UserError as exc:  # raised while parsing, before a command body runs
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
