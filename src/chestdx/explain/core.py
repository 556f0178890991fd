"""`explain(model, images, method, target)`: maps at input resolution for any chestdx model.

The model contract (what a method module provides so that its model can be explained):

- `forward(x)` returns a dict with `logits` ((B,) for one binary logit, (B, C) otherwise) and,
  where the model has one, `lesion_logits` (B, L);
- `target_layer()` returns the module whose activations the CAM family weighs;
- optionally `native_maps(x)` returns the model's own attention, (B, M, *spatial); its maps
  are averaged over M (MAG-SD's mean attention map);
- optionally `multilabel = True` for sigmoid outputs over several labels.

Nothing here assumes 2D: a (B, C, D, H, W) input gives (D, H, W) maps (Score-CAM excepted,
which pytorch-grad-cam implements for 2D only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from chestdx.errors import ChestDxError


class CAM(BaseCAM):
    """Class activation mapping (Zhou et al., CVPR 2016): M_c = sum_k w_ck A_k.

    For a head that is global average pooling then a linear layer, the spatial sum of the
    gradient of the class score over A_k is exactly w_ck, so CAM is computed from gradients
    and needs no knowledge of where the head's weights live.
    """

    def __init__(self, model, target_layers, reshape_transform=None):
        super().__init__(model, target_layers, reshape_transform)

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        return grads.sum(axis=tuple(range(2, grads.ndim)))


CAM_METHODS = {"cam": CAM, "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM,
               "layercam": LayerCAM}
METHODS = ("native", *CAM_METHODS)
_ALIASES = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}
GROUP_TARGETS = ("predicted", "classes", "lesions", "all")


def method_name(method: str) -> str:
    """Canonical name: 'Grad-CAM++', 'grad_cam++' and 'gradcampp' are all 'gradcam++'."""
    key = method.lower().replace("-", "").replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise ChestDxError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)}")
    return key


class ScoreModel(nn.Module):
    """The model's outputs as one (B, K) score matrix, classes first, then lesions.

    A single binary logit l becomes two columns (-l/2, l/2): either class can be a target, a CAM
    of the negative class is the positive class's with the sign flipped, and the softmax of the
    two columns is exactly (1 - sigmoid(l), sigmoid(l)).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return score_matrix(self.model(x))


def score_matrix(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        out = {"logits": out}
    logits = out["logits"]
    columns = torch.stack([-logits / 2, logits / 2], dim=1) if logits.ndim == 1 else logits
    if out.get("lesion_logits") is not None:
        columns = torch.cat([columns, out["lesion_logits"]], dim=1)
    return columns


def score_probabilities(scores: torch.Tensor, n_classes: int, multilabel: bool) -> torch.Tensor:
    """Class columns: softmax (sigmoid if multi-label); lesion columns: sigmoid."""
    classes = scores[:, :n_classes]
    classes = torch.sigmoid(classes) if multilabel else torch.softmax(classes, dim=1)
    return torch.cat([classes, torch.sigmoid(scores[:, n_classes:])], dim=1)


@dataclass
class Explanation:
    """maps: (B, T, *spatial) in [0, 1]; columns: (B, T) score column explained per map."""

    maps: np.ndarray
    target_names: list
    columns: np.ndarray
    names: list
    probabilities: np.ndarray  # (B, K), one per score column

    def column_name(self, b: int, t: int) -> str:
        return self.names[int(self.columns[b, t])]


def resolve_targets(target, names: list, n_classes: int) -> list:
    """Target specs -> list of (label, column or None); None means each image's predicted class.

    `target` is a column name or index, one of 'predicted', 'classes' (each class or each label
    of a multi-label model), 'lesions' (each lesion head output), 'all', or a list of these.
    """
    items = target if isinstance(target, (list, tuple)) else [target]
    lowered = {n.lower(): i for i, n in enumerate(names)}
    specs = []
    for item in items:
        if item is None or item == "predicted":
            specs.append(("predicted", None))
        elif item == "classes":
            specs += [(names[i], i) for i in range(n_classes)]
        elif item == "lesions":
            if len(names) == n_classes:
                raise ChestDxError("target 'lesions': this model has no lesion head")
            specs += [(names[i], i) for i in range(n_classes, len(names))]
        elif item == "all":
            specs += [(n, i) for i, n in enumerate(names)]
        elif isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.isdigit()):
            index = int(item)
            if not 0 <= index < len(names):
                raise ChestDxError(f"target index {index} out of range; the model has {len(names)} outputs")
            specs.append((names[index], index))
        elif isinstance(item, str) and item.lower() in lowered:
            index = lowered[item.lower()]
            specs.append((names[index], index))
        else:
            raise ChestDxError(f"unknown target {item!r}; choose from {', '.join(names)} "
                               f"or {', '.join(GROUP_TARGETS)}")
    return specs


def output_names(model: nn.Module, classes=None, lesions=None, x: torch.Tensor | None = None) -> tuple[list, int]:
    """Names of the score columns and how many of them are classes."""
    classes = list(classes) if classes else None
    lesions = list(lesions or [])
    if classes is None:
        with torch.no_grad():
            k = score_matrix(model(x[:1])).shape[1]
        classes = [f"class{i}" for i in range(k - len(lesions))]
    return classes + lesions, len(classes)


def explain(model: nn.Module, images: torch.Tensor, method: str = "gradcam++", target="predicted",
            classes=None, lesions=None, batch_size: int = 16) -> Explanation:
    """Maps for each image and target, min-max normalised to [0, 1], at input resolution.

    images: preprocessed (B, C, *spatial) tensor. classes/lesions: names of the score columns
    (defaults class0.. and no lesions).
    """
    method = method_name(method)
    model.eval()
    names, n_classes = output_names(model, classes, lesions, images)
    specs = resolve_targets(target, names, n_classes)
    multilabel = bool(getattr(model, "multilabel", False))
    scorer = ScoreModel(model).eval()
    with torch.no_grad():
        scores = torch.cat([scorer(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    if scores.shape[1] != len(names):
        raise ChestDxError(f"the model has {scores.shape[1]} outputs but {len(names)} names were given")
    probs = score_probabilities(scores, n_classes, multilabel)
    predicted = probs[:, :n_classes].argmax(1).numpy()
    columns = np.stack([predicted if col is None else np.full(len(images), col) for _, col in specs], axis=1)

    per_target = []
    for t in range(len(specs)):
        chunks = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            cols = columns[start:start + batch_size, t]
            chunks.append(_native(model, x) if method == "native" else _cam(method, model, scorer, x, cols))
        per_target.append(np.concatenate(chunks))
    maps = np.stack(per_target, axis=1).astype(np.float32)
    return Explanation(maps, [label for label, _ in specs], columns, names, probs.numpy())


def _cam(method: str, model, scorer, x: torch.Tensor, cols) -> np.ndarray:
    if not hasattr(model, "target_layer"):
        raise ChestDxError(f"{type(model).__name__} declares no target_layer(); CAM methods need one")
    if method == "scorecam" and x.ndim != 4:
        raise ChestDxError("Score-CAM is implemented for 2D images only; use gradcam or gradcam++ for volumes")
    layers = model.target_layers() if hasattr(model, "target_layers") else [model.target_layer()]
    with torch.enable_grad(), CAM_METHODS[method](model=scorer, target_layers=layers) as cam:
        if method == "scorecam":
            cam.batch_size = 64
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in cols])


def _native(model, x: torch.Tensor) -> np.ndarray:
    if not hasattr(model, "native_maps"):
        raise ChestDxError(f"{type(model).__name__} has no native attention maps; "
                           f"use one of {', '.join(CAM_METHODS)}")
    with torch.no_grad():
        maps = model.native_maps(x).float().mean(1, keepdim=True)
    mode = "bilinear" if maps.ndim == 4 else "trilinear"
    maps = F.interpolate(maps, size=x.shape[2:], mode=mode, align_corners=False)[:, 0]
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (maps.ndim - 1)
    return ((maps - lo.view(shape)) / (hi - lo).clamp(min=1e-7).view(shape)).numpy()
