"""Localization scores of a map against a reference box or mask, and their summaries.

MAG-SD's protocol (Sec. IV-F): upsample the map to the image, threshold it, then IoU with the
reference mask, or for boxes IoU between the box of the largest thresholded component and the
reference box. Added: pointing game (is the map's maximum inside the reference?) and the
share of map energy inside the reference, which needs no threshold; for lung masks, the share
outside the lungs is the shortcut score.
"""

from __future__ import annotations

import numpy as np

from chestdx.evaluate.metrics import mean_with_ci
from chestdx.explain.postprocess import bounding_box, box_to_mask, largest_component, threshold_mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def box_iou(a, b) -> float:
    """IoU of two boxes given per axis as half-open (start, stop), any dimension."""
    if a is None or b is None:
        return 0.0
    inter = np.prod([max(0, min(a1, b1) - max(a0, b0)) for (a0, a1), (b0, b1) in zip(a, b)])
    vol = lambda box: np.prod([hi - lo for lo, hi in box])  # noqa: E731
    union = vol(a) + vol(b) - inter
    return float(inter / union) if union else 0.0


def pointing_hit(m: np.ndarray, region: np.ndarray) -> bool:
    """True when the map's maximum lies in the region (ties: any maximal pixel counts)."""
    m = np.asarray(m, dtype=np.float32)
    return bool(np.asarray(region, bool)[m >= m.max()].any())


def energy_share(m: np.ndarray, region: np.ndarray) -> float:
    """Share of the (non-negative) map's sum that falls inside the region."""
    m = np.clip(np.asarray(m, dtype=np.float64), 0, None)
    total = m.sum()
    return float(m[np.asarray(region, bool)].sum() / total) if total > 0 else float("nan")


def xywh_box(x: float, y: float, w: float, h: float, scale_x: float = 1.0, scale_y: float = 1.0):
    """A boxes.csv row (pixels) as a (y, x) half-open box, optionally rescaled to a map's size."""
    return [(int(round(y * scale_y)), int(round((y + h) * scale_y))),
            (int(round(x * scale_x)), int(round((x + w) * scale_x)))]


def localize(m: np.ndarray, mask: np.ndarray | None = None, boxes=None, threshold: float | str = 0.5) -> dict:
    """Scores of one map against a reference mask or a list of boxes (their union is the region).

    Box IoU compares the largest thresholded component's box with the best-matching box.
    """
    pred = threshold_mask(m, threshold)
    region = mask if mask is not None else np.zeros(m.shape, bool)
    if boxes:
        region = np.logical_or(region, np.any([box_to_mask(m.shape, b) for b in boxes], axis=0))
    out = {"iou": mask_iou(pred, region), "pointing": float(pointing_hit(m, region)),
           "energy_in": energy_share(m, region)}
    if boxes:
        pred_box = bounding_box(largest_component(pred))
        out["box_iou"] = max(box_iou(pred_box, b) for b in boxes)
    return out


def summarise(rows: list[dict], patients, groups=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean and patient-bootstrap 95% CI of each score, overall and per group (e.g. class)."""
    keys = sorted({k for r in rows for k in r})
    patients = np.asarray(patients, dtype=str)
    groups = np.asarray(groups if groups is not None else ["all"] * len(rows), dtype=str)
    out = {}
    for name in ["all", *sorted(set(groups))]:
        sel = np.ones(len(rows), bool) if name == "all" else groups == name
        idx = np.flatnonzero(sel)
        out[name] = {k: mean_with_ci([rows[i].get(k, np.nan) for i in idx], patients[idx], n_boot, seed)
                     for k in keys}
    return out
