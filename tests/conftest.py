"""Shared fixtures: the real covid-ct data (read-only) and small files made in the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chestdx.settings import data_root


@pytest.fixture(scope="session")
def covid_ct_dir() -> Path:
    folder = data_root() / "covid-ct"
    if not (folder / "manifest.csv").exists():
        pytest.skip(f"covid-ct not found under {data_root()} (set CHESTDX_DATA)")
    return folder


@pytest.fixture(scope="session")
def pydicom_data_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Tests never touch the user's installed models."""
    monkeypatch.setenv("CHESTDX_HOME", str(tmp_path / "chestdx_home"))
    os.environ.setdefault("MPLBACKEND", "Agg")
