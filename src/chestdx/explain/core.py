"""`explain(model, images, method, target)`: maps at input resolution for any chestdx model.

The model contract (what a method module provides so that its model can be explained):

- `forward(x)` returns a dict with one entry per head (`chestdx.tasks.Head.output`), and the
  caller passes the heads (a bundle records them), or the model has a `heads` attribute;
- `target_layer()` returns the module whose activations the CAM family weighs;
- optionally `native_maps(x)` returns the model's own attention, (B, M, *spatial); its maps
  are averaged over M (MAG-SD's mean attention map);
- optionally `cam_layer(head_name)` gives each head its own layer (AG-CNN's branches) and
  `cam_to_input(maps, x, head_name)` carries a head's maps onto the input grid (the local
  branch sees a crop);

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
    """The model's heads as one (B, K) score matrix, the primary head's columns first.

    Each head's task gives its columns (`Task.score_columns`): a binary logit l becomes
    (-l/2, l/2), so either class can be a target, a CAM of the negative class is the positive
    class's with the sign flipped, and the softmax of the two columns is exactly
    (1 - sigmoid(l), sigmoid(l)); multi-class and multi-label heads give one column per label.
    """

    def __init__(self, model: nn.Module, heads):
        super().__init__()
        self.model = model
        self.heads = list(heads)

    def forward(self, x):
        return score_matrix(self.model(x), self.heads)


def score_matrix(out: dict, heads) -> torch.Tensor:
    return torch.cat([h.kind.score_columns(out[h.output]) for h in heads], dim=1)


def column_names(heads) -> list[str]:
    """One name per score column: the label, or `head:label` where another head has the same label
    (AG-CNN's branches: `Pneumonia` is the fusion head's, `global:Pneumonia` the global branch's)."""
    heads = list(heads)
    seen = {}
    for h in heads:
        for label in h.labels:
            seen[label] = seen.get(label, 0) + 1
    return [label if seen[label] == 1 or k == 0 else f"{h.name}:{label}"
            for k, h in enumerate(heads) for label in h.labels]


def column_heads(heads) -> list:
    """The head of each score column."""
    return [h for h in heads for _ in h.labels]


def score_probabilities(scores: torch.Tensor, heads) -> torch.Tensor:
    """Each head's columns as its probabilities: softmax over a binary pair or the classes of a
    multi-class head, a sigmoid per label of a multi-label head."""
    parts, start = [], 0
    for h in heads:
        cols = scores[:, start:start + len(h.labels)]
        parts.append(torch.sigmoid(cols) if h.task == "multilabel" else torch.softmax(cols, dim=1))
        start += len(h.labels)
    return torch.cat(parts, dim=1)


def ordered_heads(heads, primary: str | None = None) -> list:
    """The primary head first (its labels are the 'classes' targets), then the others."""
    heads = list(heads)
    primary = primary or heads[0].name
    return sorted(heads, key=lambda h: h.name != primary)


def model_heads(model: nn.Module, heads=None) -> list:
    heads = heads if heads is not None else getattr(model, "heads", None)
    if not heads:
        raise ChestDxError(f"{type(model).__name__}: give the model's heads (chestdx.tasks.Head) to explain it")
    return list(heads)


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


def explain(model: nn.Module, images: torch.Tensor, method: str = "gradcam++", target="predicted",
            heads=None, batch_size: int = 16) -> Explanation:
    """Maps for each image and target, min-max normalised to [0, 1], at input resolution.

    images: preprocessed (B, C, *spatial) tensor. heads: the model's heads, primary first (default:
    `model.heads`); their labels name the score columns, and 'predicted' is the primary head's most
    probable label.
    """
    method = method_name(method)
    model.eval()
    heads = model_heads(model, heads)
    names, n_classes = column_names(heads), len(heads[0].labels)
    specs = resolve_targets(target, names, n_classes)
    scorer = ScoreModel(model, heads).eval()
    with torch.no_grad():
        scores = torch.cat([scorer(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    probs = score_probabilities(scores, heads)
    predicted = probs[:, :n_classes].argmax(1).numpy()
    columns = np.stack([predicted if col is None else np.full(len(images), col) for _, col in specs], axis=1)

    owners = column_heads(heads)
    per_target = []
    for t in range(len(specs)):
        chunks = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            cols = columns[start:start + batch_size, t]
            head = owners[int(cols[0])]  # a target's columns all belong to one head
            chunks.append(_native(model, x) if method == "native" else _cam(method, model, scorer, x, cols, head))
        per_target.append(np.concatenate(chunks))
    maps = np.stack(per_target, axis=1).astype(np.float32)
    return Explanation(maps, [label for label, _ in specs], columns, names, probs.numpy())


def _cam(method: str, model, scorer, x: torch.Tensor, cols, head) -> np.ndarray:
    if not hasattr(model, "target_layer"):
        raise ChestDxError(f"{type(model).__name__} declares no target_layer(); CAM methods need one")
    if method == "scorecam" and x.ndim != 4:
        raise ChestDxError("Score-CAM is implemented for 2D images only; use gradcam or gradcam++ for volumes")
    if hasattr(model, "cam_layer"):
        layers = [model.cam_layer(head.name)]
    else:
        layers = model.target_layers() if hasattr(model, "target_layers") else [model.target_layer()]
    with torch.enable_grad(), CAM_METHODS[method](model=scorer, target_layers=layers) as cam:
        if method == "scorecam":
            cam.batch_size = 64
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in cols])
    return model.cam_to_input(maps, x, head.name) if hasattr(model, "cam_to_input") else maps


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
