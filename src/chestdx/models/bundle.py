"""A model bundle: one file that carries everything needed to use a trained model.

Registry name and constructor arguments, the heads (task kind and labels of each output, and
which one is primary), the sample kind, preprocessing, the training config, the data
fingerprint, validation metrics, the operating thresholds chosen on validation (per head, per
label), and the weights. Written atomically. `classes` is the primary head's labels, kept for
readers that only want the diagnosis.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chestdx.errors import ChestDxError
from chestdx.models.backbones import input_normalisation
from chestdx.models.ensemble import Ensemble, ensemble_class
from chestdx.models.registry import create_model, get_entry
from chestdx.tasks import Head, heads_from
from chestdx.utils import atomic_path

FORMAT = "chestdx-model-v2"
READABLE = ("chestdx-model-v1", FORMAT)  # v1: one threshold, heads implied by the registry


def model_kwargs(model_config: dict) -> dict:
    """The constructor arguments of a config's `model` section (not the name, not the init weights)."""
    return {k: v for k, v in model_config.items() if k not in ("name", "pretrained")}


def make_bundle(model: torch.nn.Module, config: dict, **metadata) -> dict:
    m = config["model"]
    entry = get_entry(m["name"])
    return {
        "format": FORMAT,
        "registry_name": m["name"],
        # A model may add constructor arguments it resolved when built (the sequence model: its
        # extractor's architecture, read from the stage-1 bundle), so the bundle rebuilds it alone.
        "model_kwargs": {**model_kwargs(m), **getattr(model, "bundle_kwargs", {})},
        "heads": [h.to_dict() for h in entry.heads],
        "primary": entry.primary,
        "classes": list(entry.classes),
        "sample": entry.sample,
        "spatial_dims": entry.spatial_dims,
        "modality": entry.modality,
        "preprocess": {**input_normalisation(m), **config["preprocess"]},
        "tta": bool(config.get("evaluate", {}).get("tta", False)),
        "tta_scales": [float(s) for s in config.get("evaluate", {}).get("tta_scales", [1.0])],
        "config": config,
        "thresholds": {},
        "ensemble": len(model.members) if isinstance(model, Ensemble) else 0,
        "ensemble_rule": model.rule if isinstance(model, Ensemble) else None,
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
    if not isinstance(bundle, dict) or bundle.get("format") not in READABLE:
        raise ChestDxError(f"{path}: not a chestdx model bundle (expected format {FORMAT})")
    if bundle["format"] != FORMAT:
        upgrade_v1(bundle)
    model = build_model(bundle)
    model.load_state_dict(bundle["state_dict"])
    model.eval()
    return model, bundle


def upgrade_v1(bundle: dict) -> None:
    """A v1 bundle (one binary threshold, heads implied by the registry) in the v2 layout."""
    entry = get_entry(bundle["registry_name"])
    bundle.update(heads=[h.to_dict() for h in entry.heads], primary=entry.primary, sample=entry.sample,
                  spatial_dims=entry.spatial_dims, format=FORMAT)
    if entry.primary_head.task == "binary":
        bundle["thresholds"] = {entry.primary: [float(bundle.get("threshold", 0.5))]}
    else:
        bundle["thresholds"] = {}


def primary_head(bundle: dict) -> Head:
    return next(h for h in heads_from(bundle) if h.name == bundle["primary"])


def thresholds(bundle: dict, head: Head) -> list[float]:
    """The head's operating thresholds: chosen on validation, 0.5 per label where none was stored."""
    stored = (bundle.get("thresholds") or {}).get(head.name)
    if stored is not None:
        return [float(t) for t in stored]
    return [0.5] * (1 if head.task == "binary" else len(head.labels))


def build_model(bundle: dict) -> torch.nn.Module:
    """The bundle's architecture, untrained: one registered model, or a seed ensemble of them."""
    def one():
        return create_model(bundle["registry_name"], pretrained=None, **bundle["model_kwargs"])

    members = int(bundle.get("ensemble") or 0)
    if not members:
        return one()
    return ensemble_class(bundle.get("ensemble_rule"))([one() for _ in range(members)], heads_from(bundle))
