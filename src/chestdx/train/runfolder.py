"""One run folder, one experiment: a folder records what it trains the first time it is used,
and resuming or reusing it with other settings or other data is refused.

Without this, a re-run with another learning rate would resume the old optimiser state, and a
seed-ensemble member or cross-validation fold finished under other settings would be kept as
if it were this run's. Only `train.epochs` may change between runs of one folder, and only
upwards: training then continues from the last checkpoint (`train.patience` may change freely).
"""

from __future__ import annotations

import json
from pathlib import Path

from chestdx.errors import ChestDxError
from chestdx.utils import write_json_atomic

SPEC_FILE = "run_spec.json"
# Settings that do not change the weights a run trains.
IGNORED = ("name", "paper", "evaluate", "train.num_workers", "train.patience")
EPOCHS = "train.epochs"


def training_settings(cfg: dict) -> dict:
    """The config flattened to dotted keys, without the settings that leave the weights alone."""
    flat = _flatten(cfg)
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED)}


def check(run_dir, cfg: dict, fingerprint: str) -> None:
    """Raise ChestDxError, naming the folder and every setting that differs, if `run_dir` already
    holds a run with other settings or data; record nothing."""
    run_dir = Path(run_dir)
    recorded = _recorded(run_dir)
    if recorded is None:
        return
    problems = _differences(recorded, _spec(cfg, fingerprint))
    if problems:
        raise ChestDxError(
            f"{run_dir} holds a run with other settings ({'; '.join(problems)}): pass another --run-dir, "
            "or delete that folder to start over")


def claim(run_dir, cfg: dict, fingerprint: str) -> None:
    """`check`, then record this run's settings and data in `run_dir`."""
    check(run_dir, cfg, fingerprint)
    write_json_atomic(Path(run_dir) / SPEC_FILE, _spec(cfg, fingerprint))


def finished(run_dir, cfg: dict) -> bool:
    """True if `run_dir` holds a finished bundle trained for as many epochs as `cfg` asks."""
    run_dir = Path(run_dir)
    summary = run_dir / "train_summary.json"
    if not ((run_dir / "model.pt").is_file() and summary.is_file()):
        return False
    done = json.loads(summary.read_text())
    return int(done["config"]["train"]["epochs"]) >= int(cfg["train"]["epochs"])


def _spec(cfg: dict, fingerprint: str) -> dict:
    return {"settings": training_settings(cfg), "data_fingerprint": fingerprint}


def _recorded(run_dir: Path) -> dict | None:
    spec = run_dir / SPEC_FILE
    if spec.is_file():
        return json.loads(spec.read_text())
    summary = run_dir / "train_summary.json"  # a folder trained before run_spec.json existed
    if summary.is_file():
        done = json.loads(summary.read_text())
        return {"settings": training_settings(done["config"]), "data_fingerprint": done.get("data_fingerprint"),
                "legacy": True}
    return None


def _differences(recorded: dict, wanted: dict) -> list[str]:
    problems = []
    if recorded.get("data_fingerprint") != wanted["data_fingerprint"]:
        problems.append("other data: the manifest, its splits or its files changed")
    old, new = recorded["settings"], wanted["settings"]
    # A bundle written before a setting existed ran with that setting's then default: compare shared keys.
    keys = set(old) & set(new) if recorded.get("legacy") else set(old) | set(new)
    for key in sorted(keys):
        before, after = old.get(key, "unset"), new.get(key, "unset")
        if key == EPOCHS and isinstance(before, int) and isinstance(after, int) and after >= before:
            continue  # more epochs: training goes on from the last checkpoint
        if before != after:
            problems.append(f"{key}: {before!r} there, {after!r} now")
    return problems


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    # JSON turns tuples into lists: compare what a round trip through the spec file gives.
    return {prefix[:-1]: json.loads(json.dumps(node, default=str))}
