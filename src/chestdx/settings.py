"""Where chestdx looks for data, weights and trained models.

Every location can be set by an environment variable so that the same code runs in this
workplace, on a laptop and in a container.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """Folder holding one sub-folder per named dataset (CHESTDX_DATA, default ../shared/data)."""
    env = os.environ.get("CHESTDX_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in (Path.cwd() / ".." / "shared" / "data", REPO_ROOT / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def home() -> Path:
    """chestdx's own folder for trained models (CHESTDX_HOME, default ~/.chestdx)."""
    return Path(os.environ.get("CHESTDX_HOME", Path.home() / ".chestdx")).expanduser()


def models_dir() -> Path:
    return home() / "models"


def default_model_path() -> Path:
    """The model `chestdx predict` uses when no --checkpoint is given (written by `make demo`)."""
    return models_dir() / "default.pt"
