"""Trust checks that none of the five papers ran on their maps.

- Model-randomization sanity check (Adebayo et al., NeurIPS 2018): maps of the trained model
  against maps of the same architecture with re-initialised weights. A method whose maps barely
  change (high SSIM) shows the image's edges, not what the model learned.
- Deletion and insertion (Petsiuk et al., BMVC 2018, "RISE"): the target probability as the
  most-attended pixels are removed (replaced by the image mean) or added (onto a blurred copy),
  in equal steps; the area under each curve. A faithful map has a low deletion AUC and a high
  insertion AUC.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.functional.image import structural_similarity_index_measure

from chestdx.explain.core import ScoreModel, score_probabilities


def randomized_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same architecture with every layer re-initialised (full randomization)."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return clone.eval()


def map_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-map SSIM of two stacks of [0, 1] maps shaped (N, *spatial)."""
    ta = torch.as_tensor(np.asarray(a, dtype=np.float32))[:, None]
    tb = torch.as_tensor(np.asarray(b, dtype=np.float32))[:, None]
    return structural_similarity_index_measure(ta, tb, data_range=1.0, reduction="none").numpy()


@torch.no_grad()
def deletion_insertion(model: torch.nn.Module, images: torch.Tensor, maps: np.ndarray, columns, heads,
                       steps: int = 16) -> dict:
    """Deletion and insertion AUCs per image. maps: (B, *spatial); columns: (B,) score column of the
    heads' score matrix (chestdx.explain.core.ScoreModel)."""
    scorer = ScoreModel(model, heads).eval()
    deletion, insertion = [], []
    for b in range(len(images)):
        x = images[b]
        order = np.argsort(-maps[b].ravel(), kind="stable")
        fractions = np.linspace(0, 1, steps + 1)
        counts = (fractions * order.size).round().astype(int)
        mean = x.mean()
        blurred = torch.from_numpy(_blur(x.numpy()))
        curves = []
        for start, fill in ((x, None), (blurred, x)):
            variants = []
            for k in counts:
                keep = torch.zeros(order.size, dtype=torch.bool)
                keep[torch.from_numpy(order[:k])] = True
                keep = keep.view(x.shape[1:]).expand_as(x)
                variants.append(torch.where(keep, mean if fill is None else fill, start))
            batch = torch.stack(variants)
            probs = score_probabilities(scorer(batch), heads)[:, int(columns[b])].numpy()
            curves.append(float(np.trapezoid(probs, fractions)))
        deletion.append(curves[0])
        insertion.append(curves[1])
    return {"deletion_auc": np.array(deletion), "insertion_auc": np.array(insertion)}


def _blur(x: np.ndarray) -> np.ndarray:
    """Gaussian blur of the spatial axes, sigma 5 px at 224 px (RISE's insertion start)."""
    sigma = 5.0 * max(x.shape[1:]) / 224
    return np.stack([ndimage.gaussian_filter(channel, sigma) for channel in x]).astype(x.dtype)
