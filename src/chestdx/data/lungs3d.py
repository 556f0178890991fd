"""Classical 3D lung segmentation of a chest CT volume, and the infection-to-lung volume ratio.

The dual-sampling paper (Ouyang et al., TMI 2020, Sec. IV-B) masks every volume to the lungs and
groups cases by the ratio of infection volume to lung volume (Sec. III-C). No learned model is
needed for the mask: lungs are the large air-filled regions inside the body. Steps:
1. air: voxels below -320 HU (CT in Hounsfield units), or below the Otsu threshold of the volume
   (windowed images with no HU);
2. outside air dropped: per axial slice, the air regions that reach the edge of the field of view
   (air around the body, under the table); a volume cropped tightly to the lungs, where the lungs
   themselves reach the edges (little of the volume's edge is air), keeps all air;
3. the largest 3D components kept (up to three: two lungs, one where they touch, a lung cut in two
   by dense infection), each at least a tenth of the largest;
4. vessels, ground glass and consolidation inside the lungs restored: a closing in 3D, then holes
   filled slice by slice.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

AIR_HU = -320.0  # lung parenchyma is about -850 HU, soft tissue above -100
LUNG_PART_SHARE = 0.1  # a further component is lung when at least this share of the largest
MAX_LUNG_PARTS = 3  # two lungs, or a lung cut in two by dense infection
CROPPED_EDGE_AIR = 0.4  # full-FOV chest CT: 0.75-0.95 of the in-plane edge is air; lung crops: < 0.2
CLOSING_MM = 8.0  # bridges dense infection at the pleura and the larger vessels


def segment_lungs(volume: np.ndarray, units: str = "HU", spacing=(1.0, 1.0, 1.0),
                  threshold: float | None = None) -> np.ndarray:
    """The lungs of a (D, H, W) CT volume as a uint8 mask (1 = lung).

    `units` "HU" thresholds at -320 HU; "intensity" (a windowed image, e.g. [0, 1] or 0-255) at the
    volume's Otsu threshold. `spacing` (mm, slice axis first) sizes the closing."""
    x = np.asarray(volume, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"lung segmentation takes a (D, H, W) volume, got shape {x.shape}")
    if threshold is None:
        threshold = AIR_HU if units == "HU" else otsu_threshold(x)
    air = x < threshold
    # A full field of view is ringed by air; a crop to the lungs is not, and its lungs reach the edges.
    cropped = _edge_air_share(air) < CROPPED_EDGE_AIR
    inside = air if cropped else _drop_outside_air(air)
    lungs = _largest_components(inside)
    return _restore_dense(lungs, spacing).astype(np.uint8)


def otsu_threshold(x: np.ndarray) -> float:
    """Otsu's threshold of a volume's values (OpenCV on an 8-bit rescaling)."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return hi
    scaled = np.round((x.reshape(-1, 1) - lo) / (hi - lo) * 255).astype(np.uint8)
    t, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return lo + float(t) / 255 * (hi - lo)


def _edge_air_share(air: np.ndarray) -> float:
    edge = [air[:, 0, :], air[:, -1, :], air[:, :, 0], air[:, :, -1]]
    return float(sum(e.sum() for e in edge)) / sum(e.size for e in edge)


def _drop_outside_air(air: np.ndarray) -> np.ndarray:
    inside = np.zeros_like(air)
    for d in range(air.shape[0]):
        labels, n = ndimage.label(air[d])
        if n == 0:
            continue
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        inside[d] = (labels > 0) & ~np.isin(labels, edge[edge > 0])
    return inside


def _largest_components(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [i + 1 for i in order[:MAX_LUNG_PARTS] if sizes[i] >= LUNG_PART_SHARE * sizes[order[0]]]
    return np.isin(labels, keep)


def _restore_dense(lungs: np.ndarray, spacing) -> np.ndarray:
    radius = [max(1, int(round(CLOSING_MM / 2 / float(s)))) for s in spacing]
    ball = _ellipsoid(radius)
    pad = [(r, r) for r in radius]
    closed = ndimage.binary_closing(np.pad(lungs, pad), structure=ball)
    closed = closed[tuple(slice(r, -r) for r in radius)]
    filled = np.stack([ndimage.binary_fill_holes(s) for s in closed])
    return filled | lungs


def _ellipsoid(radius) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / r) ** 2 for g, r in zip(grids, radius)) <= 1.0


def infection_ratio(infection: np.ndarray, lungs: np.ndarray) -> float:
    """Infection volume over lung volume (the paper's size measure, Sec. III-C); infection voxels
    outside the lung mask count, as they are lung the segmentation missed."""
    lung = float((np.asarray(lungs) > 0).sum())
    if lung == 0:
        raise ValueError("the lung mask is empty: no infection ratio")
    return float((np.asarray(infection) > 0).sum()) / lung


def lung_volume_ml(lungs: np.ndarray, spacing) -> float:
    return float((np.asarray(lungs) > 0).sum()) * float(np.prod(spacing)) / 1000.0
