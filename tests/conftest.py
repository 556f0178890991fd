"""Shared fixtures: the real covid-ct data (read-only) and small files made in the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chestdx.settings import data_root


def _real_dataset(name: str) -> Path:
    folder = data_root() / name
    if not (folder / "manifest.csv").exists():
        pytest.skip(f"{name} not found under {data_root()} (set CHESTDX_DATA)")
    return folder


@pytest.fixture(scope="session")
def covid_ct_dir() -> Path:
    return _real_dataset("covid-ct")


@pytest.fixture(scope="session")
def covid_ct_md_dir() -> Path:
    return _real_dataset("covid-ct-md")


@pytest.fixture(scope="session")
def infnet_volumes_dir() -> Path:
    return _real_dataset("infnet-ct-volumes")


@pytest.fixture(scope="session")
def pydicom_data_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Tests never touch the user's installed models."""
    monkeypatch.setenv("CHESTDX_HOME", str(tmp_path / "chestdx_home"))
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A folder with one LA-DNN bundle (untrained, 64 px): what `chestdx serve --models` loads."""
    import torch

    from chestdx.models import LADNN
    from chestdx.models.bundle import make_bundle, save_bundle
    from chestdx.train.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "ladnn_covidct.yaml", ["preprocess.size=64"])
    torch.manual_seed(0)
    model = LADNN(pretrained=None, dropout=cfg["model"].get("dropout", 0.2)).eval()
    bundle = make_bundle(model, cfg, validation={"auc": 0.5})
    bundle["thresholds"] = {"diagnosis": [0.4]}
    folder = tmp_path_factory.mktemp("models")
    save_bundle(bundle, folder / "ladnn-tiny.pt")
    return folder


@pytest.fixture(scope="session")
def cxr_covid_dir() -> Path:
    return _real_dataset("cxr-covid")



@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster (Debian's package) for the service tests; CHESTDX_TEST_PG_URL
    points at an existing server instead. Without PostgreSQL installed the tests that need it are
    skipped, except under CI (.ci/run installs it), where they fail."""
    from tests.postgres import postgres_bin, throwaway_postgres

    if os.environ.get("CHESTDX_TEST_PG_URL"):
        yield os.environ["CHESTDX_TEST_PG_URL"]
        return
    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL not installed; .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    with throwaway_postgres() as url:
        yield url
