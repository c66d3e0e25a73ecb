"""The command line: import stays light, every command has a useful --help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vfsearch.cli import app

HEAVY = ("torch", "ray", "mlflow", "zarr", "SimpleITK", "optuna")


def test_import_and_help_import_nothing_heavy():
    code = (
        "import sys, vfsearch, vfsearch.cli\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(vfsearch.cli.app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import vfsearch, vfsearch.cli, vfsearch.core.config; import os; "
        "print(sorted(os.listdir('.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        encoding="utf-8",
        check=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == "[]"


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 5


def test_python_dash_m_runs():
    out = subprocess.run(
        [sys.executable, "-m", "vfsearch", "--help"],
        capture_output=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert out.returncode == 0 and "ingest" in out.stdout


def test_output_survives_an_ascii_locale():
    """MLflow prints an emoji when a run ends; under LC_ALL=C without UTF-8 mode that used to
    kill `vfsearch tune` after a finished sweep."""
    code = (
        "import sys\nfrom vfsearch import cli\n"
        "sys.argv = ['vfsearch', '--help']\ncli._tolerant_streams()\n"
        "print('\\U0001f3c3 View run')\n"
    )
    env = {
        **os.environ,
        "PYTHONUTF8": "0",
        "PYTHONCOERCECLOCALE": "0",
        "LC_ALL": "C",
        "LANG": "C",
        "PYTHONIOENCODING": "",
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout == b"\\U0001f3c3 View run\n"
