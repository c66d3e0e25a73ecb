"""Shared fixtures. Each helper section below is owned by one module's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real CT samples in ../shared/data/real (never copied into the repository)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real CT samples not present at {REAL_DATA}")
    return REAL_DATA
