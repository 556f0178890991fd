"""Fig. 6 of the ResNet50-ATT2 paper: a series' slices, each with its own attention map weighted by
the sequence attention of that slice, as one PNG montage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from chestdx.errors import ChestDxError  # noqa: E402
from chestdx.utils import atomic_path  # noqa: E402


def weighted_maps(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(S, H, W) maps on the input grid, each slice's attention times its sequence weight (largest 1),
    and the sequence attention (S,), for one sequence x (1, S, H, W)."""
    if not hasattr(model, "weighted_slice_maps"):
        raise ChestDxError(f"{type(model).__name__} has no slice attention maps (a PyTorch sequence model has)")
    maps, attention = model.weighted_slice_maps(x)
    maps = F.interpolate(maps, size=x.shape[2:], mode="bilinear", align_corners=False)
    return maps[0].numpy(), attention[0].numpy()


def montage_png(slices: np.ndarray, maps: np.ndarray, attention: np.ndarray, path, title: str,
                labels=None, marked=None, columns: int = 4, alpha: float = 0.45) -> Path:
    """Slices (S, H, W) in [0, 1] with maps (S, H, W) in [0, 1] on top (opaque where the map is high),
    each titled with its label and sequence attention; `marked` (S,) bools outline the slices a radiologist marked, in red."""
    n = len(slices)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.45 * rows + 0.4), dpi=100, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(slices[k], cmap="gray", vmin=0, vmax=1)
        # opacity follows the map, so a slice the sequence ignores shows as plain grey
        ax.imshow(maps[k], cmap="jet", vmin=0, vmax=1, alpha=np.clip(alpha * 2 * maps[k], 0, alpha))
        name = labels[k] if labels is not None else f"slice {k}"
        ax.set_title(f"{name}  a={attention[k]:.2f}", fontsize=8,
                     color="red" if marked is not None and marked[k] else "black")
        if marked is not None and marked[k]:
            h, w = slices[k].shape
            ax.add_patch(plt.Rectangle((0, 0), w - 1, h - 1, fill=False, edgecolor="red", lw=2))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_series_montage(predictor, result: dict, shown: np.ndarray, x: torch.Tensor, path, marked=None) -> Path:
    """The montage of one predicted series (`Predictor.predict_series`)."""
    with torch.no_grad():
        maps, attention = weighted_maps(predictor.model, x)
    labels = [f"slice {s['index']}" for s in result["slices"]]
    p = result["probabilities"]
    title = f"{result['prediction']}  (" + ", ".join(f"{k} {v:.2f}" for k, v in p.items()) + ")"
    return montage_png(shown, maps, attention, path, title, labels=labels, marked=marked)
