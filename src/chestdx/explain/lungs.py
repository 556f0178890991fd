"""Lung masks for axial CT slices by classical segmentation, for the outside-the-lungs score.

Lungs are the large air regions of the slice: Otsu splits air from tissue; air around the body
(touching three or four sides of the image, or lying in a corner) is dropped, but not air that
touches one or two sides, since figures from papers are often cropped to the lungs; when the
whole body is in view (a DICOM slice of the full field), only air inside the body counts, which
drops the air between the table's rails; of what is left the (up to) two largest regions are the lungs, with vessels and nodules filled in. Good enough to tell whether a map
looks at the lungs or at the table, text and borders; not a clinical segmentation.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

MIN_LUNG_FRACTION = 0.01  # a lung smaller than 1% of the slice is noise or bowel gas


def ct_lung_mask(gray: np.ndarray, max_regions: int = 2) -> np.ndarray:
    """Boolean lung mask of a (H, W) slice with values in [0, 1] (lungs dark)."""
    u8 = np.clip(np.asarray(gray, dtype=np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    u8 = cv2.GaussianBlur(u8, (5, 5), 0)
    _, air = cv2.threshold(u8, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    air = cv2.morphologyEx(air, cv2.MORPH_OPEN, kernel)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(air, connectivity=8)
    h, w = air.shape
    body = _whole_body(1 - air)
    candidates = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= MIN_LUNG_FRACTION * h * w
                  and not _outside_body(stats[k], centroids[k], h, w)
                  and (body is None or body[labels == k].mean() >= 0.5)]
    candidates.sort(key=lambda k: -stats[k, cv2.CC_STAT_AREA])
    mask = np.isin(labels, candidates[:max_regions])
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel, iterations=2).astype(bool)
    return ndimage.binary_fill_holes(mask)


def _whole_body(tissue: np.ndarray) -> np.ndarray | None:
    """The body with its holes filled when the whole body is in view (a full-FOV DICOM slice: its
    largest tissue region touches at most two image sides), else None (a figure cropped to the
    lungs). Lungs are holes of the body; air between the table's rails or around it is not."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue.astype(np.uint8), connectivity=8)
    if n < 2:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    h, w = tissue.shape
    x, y, bw, bh = (int(stats[k, i]) for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                               cv2.CC_STAT_HEIGHT))
    if (x == 0) + (y == 0) + (x + bw == w) + (y + bh == h) > 2:
        return None
    return ndimage.binary_fill_holes(labels == k)


def _outside_body(stat, centroid, h: int, w: int) -> bool:
    x, y, bw, bh = (int(stat[i]) for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    sides = (x == 0) + (y == 0) + (x + bw == w) + (y + bh == h)
    cx, cy = centroid[0] / w, centroid[1] / h
    in_corner = min(cx, 1 - cx) < 0.15 and min(cy, 1 - cy) < 0.15
    return sides >= 3 or in_corner
