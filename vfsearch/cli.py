"""The ``vfsearch`` command line. Each command parses, calls one library function, prints.

Heavy libraries are imported inside the commands, so ``vfsearch --help`` stays fast.
A `UserError` anywhere below becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vfsearch.errors import UserError

app = typer.Typer(
    name="vfsearch",
    help="Hyperparameter search for vertebral-fracture segmentation in CT "
    "(Attention U-Net + LSTM over slice windows, Ray Tune + Optuna, MLflow).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created). Holds one folder per "
                                        "case and manifest.csv.")],
    cases: Annotated[int, typer.Option(min=1, help="Number of synthetic cases.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    spacing: Annotated[Optional[str], typer.Option(
        help="Voxel spacing x,y,z in mm (default: anisotropic 0.8,0.8,2.0; small: 2,2,2).")] = None,
    small: Annotated[bool, typer.Option(
        "--small", help="Small, coarse volumes for tests and quick demos.")] = False,
    fracture_rate: Annotated[float, typer.Option(
        help="Share of vertebrae fractured (0-1).")] = 0.22,
    background: Annotated[Optional[Path], typer.Option(
        help="Simulate fractures on this real CT instead of a phantom.")] = None,
    vertebrae: Annotated[Optional[Path], typer.Option(
        help="Vertebra label map of --background.")] = None,
    fracture: Annotated[Optional[str], typer.Option(
        help="With --background: vertebrae to fracture as id:grade:morphology, comma "
        "separated (e.g. 22:2:wedge,20:3:crush); default: one random vertebra.")] = None,
    label_scheme: Annotated[str, typer.Option(
        help="Label ids of --vertebrae: verse or totalsegmentator.")] = "verse",
) -> None:
    """Write synthetic thoracolumbar CT (T4-L5) with vertebra labels and fracture masks.

    Each case gets ct.nii.gz, vertebrae.nii.gz (VerSe ids 11-24), fracture.nii.gz (the
    deformed endplate zone and its sclerotic band) and meta.json (grade, morphology and
    measured height ratio per vertebra). With --background, fractures are simulated on a
    real scan instead.
    """
    from vfsearch.data import synth as synth_mod

    with _errors():
        if background is not None or vertebrae is not None:
            result = synth_mod.synth_on_background(
                background, vertebrae, out, fracture=fracture, seed=seed,
                label_scheme=label_scheme)
        else:
            result = synth_mod.synth_dataset(
                out, cases=cases, seed=seed, spacing=_parse_spacing(spacing, "--spacing"),
                small=small, fracture_rate=fracture_rate)
    typer.echo(result)


@app.command()
def ingest(
    source: Annotated[Path, typer.Argument(help="A manifest CSV (case_id, ct, vertebrae, "
                                           "fracture[, split]), a synth folder or a VerSe tree.")],
    out: Annotated[Path, typer.Option("--out", help="Zarr store to create or extend.")],
    spacing: Annotated[str, typer.Option(help="Resampling spacing x,y,z in mm.")] = "1,1,1",
    margin: Annotated[float, typer.Option(help="Crop margin around each vertebra, mm.")] = 8.0,
    label_scheme: Annotated[str, typer.Option(
        help="Vertebra ids of the label maps: verse or totalsegmentator.")] = "verse",
    split: Annotated[str, typer.Option(
        help="train,val,test fractions for cases without a split column.")] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="Seed of the case-level split.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Cases ingested in parallel.")] = 1,
) -> None:
    """Ingest CT + vertebra labels (+ fracture masks) into a Zarr store of vertebra crops.

    Reorients to one canonical orientation, resamples, crops each vertebra T4-L5 with a
    margin and stores int16 HU and uint8 masks with the geometry to map back to the scanner.
    Re-running skips finished cases; an interrupted case is redone.
    """
    from vfsearch.data import ingest as ingest_mod

    with _errors():
        summary = ingest_mod.ingest(
            source, out, spacing=_parse_spacing(spacing, "--spacing"), margin_mm=margin,
            label_scheme=label_scheme, split=_parse_fractions(split), seed=seed,
            workers=workers)
    typer.echo(summary)


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
    return values  # type: ignore[return-value]


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise UserError(f"--split: expected train,val,test fractions summing to 1, got {text!r}")
    return values  # type: ignore[return-value]


class _errors:
    """Turn `UserError` into one line on stderr and exit code 2."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> bool:
        if isinstance(exc, UserError):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2)
        return False


def main() -> None:
    try:
        app()
    except UserError as exc:  # raised while parsing, before a command body runs
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
