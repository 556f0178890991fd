"""A model bundle: one file that carries everything needed to use a trained model.

Registry name and constructor arguments, classes and lesion names, preprocessing, the
training config, the data fingerprint, validation metrics, the operating threshold chosen on
validation, and the weights. Written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chestdx.errors import ChestDxError
from chestdx.models.backbones import grey_normalisation
from chestdx.models.ensemble import Ensemble
from chestdx.models.registry import create_model, get_entry
from chestdx.utils import atomic_path

FORMAT = "chestdx-model-v1"


def model_kwargs(model_config: dict) -> dict:
    """The constructor arguments of a config's `model` section (not the name, not the init weights)."""
    return {k: v for k, v in model_config.items() if k not in ("name", "pretrained")}


def make_bundle(model: torch.nn.Module, config: dict, **metadata) -> dict:
    m = config["model"]
    entry = get_entry(m["name"])
    return {
        "format": FORMAT,
        "registry_name": m["name"],
        "model_kwargs": model_kwargs(m),
        "classes": list(entry.classes),
        "lesions": list(entry.lesions),
        "modality": entry.modality,
        "preprocess": {**grey_normalisation(m["backbone"]), **config["preprocess"]},
        "tta": bool(config.get("evaluate", {}).get("tta", False)),
        "tta_scales": [float(s) for s in config.get("evaluate", {}).get("tta_scales", [1.0])],
        "config": config,
        "threshold": 0.5,
        "ensemble": len(model.members) if isinstance(model, Ensemble) else 0,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        **metadata,
    }


def save_bundle(bundle: dict, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)
    return path


def load_bundle(path) -> tuple[torch.nn.Module, dict]:
    path = Path(path)
    if not path.is_file():
        raise ChestDxError(f"{path}: model file not found")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ChestDxError(f"{path}: not a readable chestdx model ({err})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ChestDxError(f"{path}: not a chestdx model bundle (expected format {FORMAT})")
    model = build_model(bundle)
    model.load_state_dict(bundle["state_dict"])
    model.eval()
    return model, bundle


def build_model(bundle: dict) -> torch.nn.Module:
    """The bundle's architecture, untrained: one registered model, or a seed ensemble of them."""
    def one():
        return create_model(bundle["registry_name"], pretrained=None, **bundle["model_kwargs"])

    members = int(bundle.get("ensemble") or 0)
    return Ensemble([one() for _ in range(members)]) if members else one()
