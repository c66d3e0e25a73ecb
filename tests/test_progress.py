"""Progress people can read (`vfsearch.adapters.progress`): bars with an ETA and one line per
epoch or
trial at a terminal, nothing but the final summary off one, and Ray's own noise only with
``--verbose``. Terminals are real pseudo-terminals (`pty`), not a faked ``isatty``."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from vfsearch.adapters import progress

RAY_NOISE = (
    "Token authentication",
    "PreemptionWatcher",
    "Reporting training result",
    "Trial status",
    "(RayTrainWorker",
    "(TrainController",
)


def run_in_pty(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a fresh pseudo-terminal (160 columns);
    returns (exit code, everything it printed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen(
        args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        close_fds=True,
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break  # exited, and nothing left to read (a daemon may hold the pty open)
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"timed out; output so far:\n{out.decode(errors='replace')}")
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
    return code, out.decode(errors="replace").replace("\r\n", "\n")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (progress.ENV, "RAY_ADDRESS")}
    return {**env, **extra}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vfsearch", *args]


# -- the helper ------------------------------------------------------------------------------


def test_helper_is_silent_off_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress.enabled()  # pytest captures both streams
    for _ in progress.bar(range(3), "x"):
        pass
    with progress.bar(desc="y", total=2) as bar:
        bar.update(2)
    progress.say("a line")
    assert capsys.readouterr() == ("", "")


def test_environment_forces_progress_on_or_off(monkeypatch):
    for value, expected in (("1", True), ("on", True), ("0", False), ("off", False)):
        monkeypatch.setenv(progress.ENV, value)
        assert progress.enabled() is expected


def test_helper_shows_a_bar_with_eta_and_lines_on_a_terminal():
    code = (
        "import time\nfrom vfsearch.adapters import progress\n"
        "for _ in progress.bar(range(4), 'cases', unit='case'):\n    time.sleep(0.3)\n"
        "progress.say('a progress line')\n"
    )
    rc, out = run_in_pty([sys.executable, "-c", code], env=_env(), timeout=120)
    assert rc == 0, out
    assert "a progress line" in out
    # tqdm's bar: count, then [elapsed<remaining, rate]: the remaining time is the ETA
    assert re.search(r"cases: +\d+%.*\| 4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+s?/?case", out), out
    assert re.search(r"1/4 \[\d\d:\d\d<\d\d:\d\d", out), out  # an ETA while it runs


def test_durations():
    assert [progress.duration(s) for s in (0, 44.6, 65, 3599, 3600 * 3 + 1260)] == [
        "0s",
        "45s",
        "1m05s",
        "59m59s",
        "3h21m",
    ]
    assert progress.duration(None) == progress.duration(float("nan")) == "?"


def test_epoch_line_has_losses_dice_rate_and_eta():
    from vfsearch.pipelines.train.worker import format_epoch

    m = {
        "train/loss": 0.5,
        "train/dice": 0.3,
        "train/bce": 0.2,
        "train/grad_norm": 1.0,
        "val_dice": 0.25,
        "val_iou": 0.14,
        "lr": 1e-3,
        "windows_per_s": 40.0,
        "epoch_time": 12.0,
    }
    line = format_epoch(3, 10, m, eta_s=84)
    assert line == (
        "epoch 3/10  loss 0.5000 (dice 0.3000 bce 0.2000)  val dice 0.2500 "
        "iou 0.1400  lr 1.00e-03  40.0 windows/s  12.0 s  eta 1m24s"
    )
    assert "\n" not in line and "eta" not in format_epoch(3, 10, m)


def test_sweep_eta_from_finished_durations_and_concurrency():
    from vfsearch.pipelines.tune import sweep_eta

    assert sweep_eta([100.0, 300.0], remaining=4, concurrency=2) == pytest.approx(400.0)
    assert sweep_eta([100.0], remaining=1, concurrency=4) == pytest.approx(100.0)
    assert sweep_eta([], remaining=3, concurrency=1) is None
    assert sweep_eta([], remaining=0, concurrency=1) == 0.0
    # the running trial has done 40 s of its expected 100 s
    assert sweep_eta([100.0], remaining=2, concurrency=1, elapsed=[40.0]) == pytest.approx(160)
    assert sweep_eta([100.0], remaining=1, concurrency=1, elapsed=[150.0]) == 0.0


def test_trial_lines_callback(capsys, monkeypatch):
    """Tune's driver-side callback: a line per epoch result and per finished trial, with
    trials done/total and an ETA; the final (fused 3D) report waits for the completion."""
    from vfsearch.adapters.search_space import SearchSpace
    from vfsearch.pipelines.tune import _trial_lines

    monkeypatch.setenv(progress.ENV, "1")

    class FakeTrial:
        def __init__(self, trial_id: str) -> None:
            self.trial_id, self.finished, self.last_result = trial_id, False, {}

        def is_finished(self) -> bool:
            return self.finished

    space = SearchSpace("test.yaml", epochs=2)
    cb = _trial_lines(space, total=3, concurrency=1)
    a, b = FakeTrial("a_00000"), FakeTrial("b_00001")
    trials = [a, b]
    epoch = {
        "train/loss": 0.5,
        "train/dice": 0.3,
        "val_dice": 0.2,
        "val_iou": 0.1,
        "lr": 1e-3,
        "windows_per_s": 10.0,
        "epoch_time": 1.0,
        "best_val_dice": 0.2,
        "best_epoch": 1,
    }
    cb.on_trial_start(0, trials, a)
    cb.on_trial_result(0, trials, a, {**epoch, "epoch": 1})
    cb.on_trial_result(0, trials, a, {**epoch, "epoch": 2})
    final = {**epoch, "epoch": 2, "val_dice3d": 0.42, "final_eval_s": 1.0}
    cb.on_trial_result(0, trials, a, final)
    a.last_result, a.finished = final, True
    cb.on_trial_complete(0, trials, a)
    cb.on_trial_start(0, trials, b)
    cb.on_trial_result(0, trials, b, {**epoch, "epoch": 1})
    b.last_result, b.finished = {**epoch, "epoch": 1}, True
    cb.on_trial_complete(0, trials, b)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5, lines
    assert (
        lines[0].startswith("trial a_00000  epoch 1/2  loss 0.5000")
        and "trials 0/3 done  eta " in lines[0]
    )
    assert "eta ?" not in lines[0]  # the running trial's pace stands in for a duration
    assert (
        lines[2].startswith("trial a_00000  completed  val_dice3d 0.4200")
        and "trials 1/3 done" in lines[2]
    )
    assert lines[3].startswith("trial b_00001  epoch 1/2")
    assert (
        lines[4].startswith("trial b_00001  stopped early after epoch 1")
        and "trials 2/3 done" in lines[4]
    )


# -- commands: nothing but the summary off a terminal ----------------------------------------


@pytest.fixture(scope="module")
def raw_cases(tmp_path_factory) -> Path:
    """Three small phantom cases written by `vfsearch synth` with stdout not a terminal."""
    root = tmp_path_factory.mktemp("progress")
    out = subprocess.run(
        _cli("synth", str(root / "raw"), "--cases", "3", "--small"),
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and not out.stderr, (out.stdout, out.stderr)
    return root / "raw"


@pytest.mark.integration
def test_ingest_off_a_terminal_prints_only_the_summary(raw_cases, tmp_path):
    store = tmp_path / "store.zarr"
    args = _cli(
        "ingest",
        str(raw_cases / "manifest.csv"),
        "--out",
        str(store),
        "--spacing",
        "2,2,2",
        "--split",
        "0.34,0.33,0.33",
    )
    out = subprocess.run(args, capture_output=True, text=True, env=_env(), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines() == [out.stdout.strip()]
    assert "3 case(s) ingested" in out.stdout


@pytest.mark.integration
def test_ingest_on_a_terminal_shows_a_bar(raw_cases, tmp_path):
    store = tmp_path / "store.zarr"
    rc, out = run_in_pty(
        _cli(
            "ingest",
            str(raw_cases / "manifest.csv"),
            "--out",
            str(store),
            "--spacing",
            "2,2,2",
            "--split",
            "0.34,0.33,0.33",
        ),
        env=_env(),
    )
    assert rc == 0, out
    assert re.search(r"ingest: 100%.*3/3 \[\d\d:\d\d<\d\d:\d\d", out), out
    assert "3 case(s) ingested" in out  # the summary after the bar


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny segmenter in the layout `vfsearch.pipelines.train` writes (best.pt)."""
    import torch

    from vfsearch.core.config import Config, DataConfig, ModelConfig
    from vfsearch.core.models import build_model

    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(depth=3, base_channels=2, temporal="none"),
        data=DataConfig(seq_len=1, plane="axial", patch_size=16),
    )
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save(
        {"model": build_model(config.model, 1).state_dict(), "config": config.flatten()}, path
    )
    return path


@pytest.mark.integration
def test_evaluate_off_and_on_a_terminal(small_store, checkpoint, tmp_path):
    args = _cli(
        "evaluate",
        "--model",
        str(checkpoint),
        "--store",
        str(small_store),
        "--split",
        "test",
        "--out",
        str(tmp_path / "e"),
    )  # threshold chosen on val
    out = subprocess.run(args, capture_output=True, text=True, env=_env(), check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("segmentation model on test (1 cases), threshold"), lines
    assert not any("choosing the threshold" in ln or "%|" in ln for ln in lines), lines
    assert "\r" not in out.stdout + out.stderr and "%|" not in out.stderr

    rc, tty = run_in_pty(args, env=_env())
    assert rc == 0, tty
    assert "choosing the threshold on val" in tty
    for desc in (r"threshold \(val\)", r"evaluate \(test\)"):  # per vertebra, with an ETA
        assert re.search(desc + r": 100%.*\| (\d+)/\1 \[\d\d:\d\d<\d\d:\d\d", tty), tty
    assert "pooled (micro)" in tty


# -- train: one line per epoch on the console, Ray kept out -----------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_train_prints_one_clean_line_per_epoch(small_store, mlflow_server, tmp_path):
    from test_train import TINY

    sets = [a for s in TINY for a in ("--set", s)]
    base = _cli(
        "train",
        "--store",
        str(small_store),
        "--epochs",
        "2",
        "--workdir",
        str(tmp_path),
        *sets,
        "--set",
        "train.log_pictures=false",
    )
    env = _env(MLFLOW_TRACKING_URI=mlflow_server)
    rc, out = run_in_pty(base + ["--name", "quiet"], env=env)
    assert rc == 0, out
    epochs = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 2, out
    for i, ln in enumerate(epochs, 1):
        assert re.match(rf"epoch {i}/2  loss .* val dice .* windows/s .* eta \d", ln), ln
    for noise in RAY_NOISE:
        assert noise not in out, (noise, out)
    assert "run quiet: 2 epochs, best val dice" in out

    rc, loud = run_in_pty(base + ["--name", "loud", "--verbose"], env=env)
    assert rc == 0, loud
    assert len([ln for ln in loud.splitlines() if ln.startswith("epoch ")]) == 2, loud
    assert "Started a local Ray instance" in loud  # Ray's own INFO lines come back
