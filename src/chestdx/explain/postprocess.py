"""Post-processing of maps as the papers do it; every function works on 2D and 3D arrays.

- normalise: min-max to [0, 1];
- threshold_mask: fixed fraction of the maximum (MAG-SD, AG-CNN) or Otsu (ResNet50-ATT2);
- largest_component and bounding_box: AG-CNN's crop, MAG-SD's box for IoU;
- sqrt_product: ResNet50-ATT2's combination of two attention maps, sqrt(a * b).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage


def normalise(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def otsu_threshold(m: np.ndarray) -> float:
    """Otsu's threshold of a [0, 1] map, in map units (OpenCV on 8-bit levels)."""
    u8 = np.clip(normalise(m) * 255 + 0.5, 0, 255).astype(np.uint8).reshape(-1, 1)
    level, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return (level + 0.5) / 255.0  # OpenCV keeps rounded levels > level, i.e. m >= this


def threshold_mask(m: np.ndarray, threshold: float | str = "otsu") -> np.ndarray:
    """Boolean mask of the normalised map: >= threshold (a fraction of the maximum) or Otsu."""
    m = normalise(m)
    level = otsu_threshold(m) if threshold == "otsu" else float(threshold)
    return m >= level


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (8-connected in 2D, 26-connected in 3D)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    if mask.ndim == 2:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """Per axis (array order: [z,] y, x) the half-open (start, stop) of the mask; None if empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def box_to_xywh(box) -> dict:
    """A 2D (y, x) box as {x, y, w, h}, the layout of boxes.csv."""
    (y0, y1), (x0, x1) = box
    return {"x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0}


def box_to_mask(shape, box) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(lo, hi) for lo, hi in box)] = True
    return mask


def sqrt_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sqrt(a * b) of two normalised maps: high only where both attend."""
    return np.sqrt(normalise(a) * normalise(b))
