"""Experiment configs: one YAML per paper reproduction, with dotted command-line overrides."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from chestdx.errors import ChestDxError

DEFAULTS = {
    "name": "experiment",
    "dataset": "covid-ct",
    "model": {"name": "ladnn", "backbone": "efficientnet_lite0", "pretrained": "imagenet", "dropout": 0.2,
              "drop_path": 0.0},
    "preprocess": {"size": 224, "resize": "pad", "channels": 1, "clahe": False, "zscore": False},
    "augment": {"affine": True, "shear": 0.2, "scale": [0.8, 1.2], "hflip": 0.5, "jpeg": 0.0,
                "brightness_contrast": 0.0, "translate": 0.0},
    "train": {"epochs": 20, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-2, "warmup_epochs": 1,
              "lesion_weight": 1.0, "label_smoothing": 0.0, "seed": 0, "patience": 10, "num_workers": 0,
              "limit_per_split": 0, "channels_last": True, "ensemble": 1,
              "negatives_lesion_free": False, "freeze_stages": 0},
    "evaluate": {"tta": True, "tta_scales": [1.0], "bootstrap": 1000},
}


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path=None, overrides=()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        cfg = deep_merge(cfg, read_config_file(Path(path)))
    for item in overrides:
        apply_override(cfg, item)
    return _numbers(cfg)


# YAML 1.1 (PyYAML) reads 1e-3, written without a dot, as a string; everyone means the number.
_SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _numbers(node):
    if isinstance(node, dict):
        return {k: _numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v) for v in node]
    if isinstance(node, str) and _SCIENTIFIC.fullmatch(node.strip()):
        return float(node)
    return node


def read_config_file(path: Path, _seen=()) -> dict:
    """One YAML file; `base: other.yaml` (relative to it) is read first and updated by the rest,
    so an ablation row states only what it changes. Sections named in `replace: [...]` take the
    place of the base's sections instead of updating them (another model, another paper row)."""
    if not path.is_file():
        raise ChestDxError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ChestDxError(f"{path}: `base` refers back to itself")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ChestDxError(f"{path}: not valid YAML ({err})") from None
    base, replace = loaded.pop("base", None), loaded.pop("replace", [])
    if base:
        inherited = read_config_file(path.parent / base, (*_seen, path.resolve()))
        for section in replace:
            inherited.pop(section, None)
        loaded = deep_merge(inherited, loaded)
    return loaded


def apply_override(cfg: dict, item: str) -> None:
    """`a.b=value`, the value parsed as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise ChestDxError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    node = cfg
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ChestDxError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)
