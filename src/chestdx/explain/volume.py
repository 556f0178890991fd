"""Explanations of 3D CT models for a radiologist: heat-map volumes, slice montages, 3D Grad-CAM.

- `write_heatmap_nifti`: a (D, H, W) map as a float32 NIfTI on the scan's grid (its affine), so a
  viewer overlays it on the CT; `chestdx.data.volumes.read_volume` reads it back unchanged;
- `montage_png`: evenly spaced slices (axial, coronal or sagittal) in a grid, each with the map in
  jet (`render.overlay_rgb`), the outline of a reference mask and its slice index, under a title;
- `grad_cam_3d`: Grad-CAM of a binary head through pytorch-grad-cam, upsampled trilinearly;
- `attention_shares` and `localization_3d`: the scores of `localization` (all nD) on volumes.

pytorch-grad-cam 1.5.7 handles 5D activations and gradients (GradCAM averages the gradients over
(D, H, W)), but it upsamples a 3D CAM with `scipy.ndimage.zoom` at spline order 3, which rings
(values outside the map's range, clipped and renormalised afterwards) and maps corner voxel to
corner voxel; 2D maps get OpenCV's bilinear resize. `_LowResGradCAM` therefore keeps the CAM at the
layer's resolution (one overridden method) and `grad_cam_3d` upsamples it like `F.interpolate`
(trilinear, align_corners=False), as the models' own attention (`dsan.soft_mask`) is upsampled.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from chestdx.data.volumes import sequence_indices, write_nifti
from chestdx.errors import ChestDxError
from chestdx.explain.localization import energy_share, localize
from chestdx.explain.postprocess import normalise
from chestdx.explain.render import overlay_rgb
from chestdx.tasks import TASKS
from chestdx.utils import atomic_path

TITLE_HEIGHT = 28  # pixels of the montage's title strip
AXIS_NAMES = ("axial", "coronal", "sagittal")
AXIS_LETTERS = ("z", "y", "x")  # written before each tile's slice index
OUTLINE_RGB = (255, 255, 255)  # the reference mask's outline (jet has no white)
POSITIVE = 1  # the positive class's column of a binary head (`Binary.score_columns`)


# ---------------------------------------------------------------- NIfTI


def write_heatmap_nifti(heat: np.ndarray, affine: np.ndarray, path) -> Path:
    """Write a (D, H, W) map as a float32 .nii/.nii.gz on the volume's grid, atomically.

    `affine` maps (d, h, w) indices to world mm (`Volume.affine`). `read_nifti` reads voxels
    (X, Y, Z) as (D, H, W) = (Z, Y, X) and takes the affine's columns in (k, j, i) order, so this
    writes the inverse: voxels heat.transpose(2, 1, 0) and the affine's columns reordered (w, h, d);
    a round trip gives the same array and affine. Both sform and qform are set (code 1, scanner).
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ChestDxError(f"{path}: a heat-map volume is written as .nii or .nii.gz")
    heat = np.asarray(heat, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if heat.ndim != 3:
        raise ChestDxError(f"a heat-map volume is (D, H, W), got shape {heat.shape}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ChestDxError(f"the affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if not np.isfinite(heat).all():
        raise ChestDxError("the heat map contains NaN or infinite values")
    return write_nifti(heat, affine, path, np.float32)


# ---------------------------------------------------------------- montages


def choose_slices(heat: np.ndarray, n: int, axis: int = 0, floor: float = 0.0) -> list[int]:
    """Up to `n` evenly spaced slice indices along `axis` among the slices that show something.

    Rule: a slice counts when some voxel of it exceeds `floor` (pass the heat map, a lung mask, or
    a lung-masked input such as DSAN's, which is zero outside the lungs). Among the m counted slices,
    in order, pick positions round(k (m - 1) / (n - 1)), k = 0..n-1 (`volumes.sequence_indices`: the
    first and last counted slices are included); with m <= n all counted slices are returned. When
    no slice counts, the rule is applied to all slices.
    """
    heat = np.asarray(heat)
    _check_axis(axis, heat.ndim)
    n = int(n)
    if n < 1:
        raise ChestDxError(f"choose at least one slice, got n={n}")
    other = tuple(a for a in range(heat.ndim) if a != axis)
    shown = np.flatnonzero((heat > floor).any(axis=other))
    if shown.size == 0:
        shown = np.arange(heat.shape[axis])
    if shown.size <= n:
        return [int(i) for i in shown]
    return [int(shown[i]) for i in sequence_indices(shown.size, n)]


def montage_png(volume: np.ndarray, heat: np.ndarray | None, path, title: str, n_tiles: int = 16, axis: int = 0,
                mask: np.ndarray | None = None, slices: list[int] | None = None, alpha: float = 0.45,
                spacing=None) -> Path:
    """A grid of slices along `axis` (0 axial, 1 coronal, 2 sagittal) with the map on top, as PNG.

    volume: (D, H, W) grey in [0, 1]; heat: (D, H, W) in [0, 1] or None (grey tiles); mask: (D, H, W)
    bool reference (e.g. the labelled infection) drawn as a white outline. `slices` defaults to
    `choose_slices(volume * heat, n_tiles, axis)`, the slices where both the (lung-masked) input and
    the map are nonzero (the volume alone when there is no heat). Tiles keep the
    slice's pixels: axial tiles are (H, W) as stored; coronal (D, W) and sagittal (D, H) tiles show the
    slice axis upright, the highest d at the top (the head end for the usual DICOM and NIfTI axial
    orders, where d increases towards the head). `spacing` (d, h, w) mm, when given, stretches a
    tile's rows so that its pixels are square. The grid is ceil(sqrt(n)) tiles wide, the rows it
    needs tall, with a `TITLE_HEIGHT` strip on top; each tile carries its slice index ("z 12").
    """
    volume = _volume(volume, "volume")
    heat = None if heat is None else _volume(heat, "heat", volume.shape)
    mask = None if mask is None else _volume(mask, "mask", volume.shape).astype(bool)
    _check_axis(axis, 3)
    if slices is None:
        shown = volume if heat is None else np.clip(volume, 0, None) * np.clip(heat, 0, None)
        slices = choose_slices(shown, n_tiles, axis)
    slices = [int(s) for s in slices]
    if not slices:
        raise ChestDxError("a montage needs at least one slice")
    bad = [s for s in slices if not 0 <= s < volume.shape[axis]]
    if bad:
        raise ChestDxError(f"slice {bad[0]} is outside the volume's {volume.shape[axis]} {AXIS_NAMES[axis]} slices")

    tiles = [_tile(volume, heat, mask, axis, s, alpha, spacing) for s in slices]
    th, tw = tiles[0].shape[:2]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    canvas = np.zeros((TITLE_HEIGHT + rows * th, cols * tw, 3), np.uint8)
    canvas[:TITLE_HEIGHT] = 32
    _put_title(canvas, title)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        canvas[TITLE_HEIGHT + r * th:TITLE_HEIGHT + (r + 1) * th, c * tw:(c + 1) * tw] = tile
    with atomic_path(path) as tmp:  # the temporary name keeps the .png suffix OpenCV needs
        if not cv2.imwrite(str(tmp), canvas[..., ::-1]):
            raise OSError(f"could not write {path}")
    return Path(path)


def _volume(a, name: str, shape=None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise ChestDxError(f"{name} must be a (D, H, W) volume, got shape {a.shape}")
    if shape is not None and a.shape != tuple(shape):
        raise ChestDxError(f"{name} has shape {a.shape}, the volume {tuple(shape)}")
    if a.dtype != bool and not np.isfinite(a).all():
        raise ChestDxError(f"{name} contains NaN or infinite values")
    return a


def _check_axis(axis: int, ndim: int) -> None:
    if axis not in range(ndim):
        raise ChestDxError(f"axis must be 0 (axial), 1 (coronal) or 2 (sagittal), got {axis}")


def _plane(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice as shown: axial as stored, coronal and sagittal with d upright (highest d on top)."""
    s = np.take(a, index, axis=axis)
    return s if axis == 0 else s[::-1]


def _tile(volume, heat, mask, axis: int, index: int, alpha: float, spacing) -> np.ndarray:
    gray = np.clip(_plane(volume, axis, index).astype(np.float32), 0, 1)
    if heat is not None:
        rgb = overlay_rgb(gray, np.clip(_plane(heat, axis, index).astype(np.float32), 0, 1), alpha=alpha)
    else:
        g = np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8)
        rgb = np.stack([g] * 3, -1)
    m = None if mask is None else _plane(mask, axis, index).astype(np.uint8)
    if spacing is not None:
        row_mm, col_mm = [float(v) for i, v in enumerate(spacing) if i != axis]
        rows = max(1, int(round(rgb.shape[0] * row_mm / col_mm)))
        if rows != rgb.shape[0]:
            rgb = cv2.resize(rgb, (rgb.shape[1], rows), interpolation=cv2.INTER_LINEAR)
            m = None if m is None else cv2.resize(m, (rgb.shape[1], rows), interpolation=cv2.INTER_NEAREST)
    rgb = np.ascontiguousarray(rgb)
    if m is not None and m.any():
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, OUTLINE_RGB, 1)
    _label(rgb, f"{AXIS_LETTERS[axis]} {index}")
    return rgb


def _label(rgb: np.ndarray, text: str) -> None:
    """The slice index, top left, white on a black outline."""
    scale = max(0.3, min(rgb.shape[:2]) / 400)
    (_, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    org = (3, 3 + h)
    cv2.putText(rgb, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(rgb, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _put_title(canvas: np.ndarray, title: str) -> None:
    """The title in the strip, shrunk to fit the width (down to a legible minimum, then clipped)."""
    scale = 0.55
    (w, h), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if w > canvas.shape[1] - 8:
        scale = max(0.3, scale * (canvas.shape[1] - 8) / w)
        (w, h), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.putText(canvas, title, (4, (TITLE_HEIGHT + h) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)


# ---------------------------------------------------------------- 3D Grad-CAM


class _LowResGradCAM(GradCAM):
    """GradCAM that returns the map at the target layer's resolution (min-max normalised), because
    pytorch-grad-cam's 3D resize is a cubic-spline `zoom`; `grad_cam_3d` upsamples trilinearly.

    With no target size, `BaseCAM.compute_cam_per_layer` skips `scale_cam_image`'s resize.
    """

    def get_target_width_height(self, input_tensor):
        return None


class _BinaryScores(nn.Module):
    """A model's binary logit (N,) as the (N, 2) columns of `Binary.score_columns`, (-l/2, l/2),
    as `core.ScoreModel` scores it: column 1 is the positive class."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x):
        out = self.model(x)
        if not isinstance(out, dict) or self.output not in out:
            raise ChestDxError(f"{type(self.model).__name__}: forward returns no {self.output!r} output")
        logits = out[self.output]
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.ndim != 1:
            raise ChestDxError(f"grad_cam_3d explains a binary head, one logit per volume (N,); "
                               f"{self.output!r} has shape {tuple(logits.shape)}")
        return TASKS["binary"].score_columns(logits)


def grad_cam_3d(model: nn.Module, x: torch.Tensor, target_layer: nn.Module, output: str = "logits") -> np.ndarray:
    """Grad-CAM (D, H, W) in [0, 1] of the positive class of the binary logit `output` for one volume.

    x: (1, C, D, H, W). The map is computed at `target_layer`'s resolution, upsampled trilinearly
    (align_corners=False) to (D, H, W) and min-max normalised (all zeros if the CAM is). The hooks
    are removed on leaving (context manager), the model's train/eval mode is restored and the
    parameter gradients Grad-CAM accumulated are cleared.
    """
    if x.ndim != 5 or x.shape[0] != 1:
        raise ChestDxError(f"grad_cam_3d takes one volume (1, C, D, H, W), got shape {tuple(x.shape)}")
    was_training = model.training
    scorer = _BinaryScores(model, output)
    # A leaf that needs its gradient: the target layer's output then carries one even when the
    # model's parameters are frozen (pytorch-grad-cam records gradients only on such tensors).
    x = x.detach().clone().requires_grad_(True)
    maps = None
    try:
        # BaseCAM.__exit__ swallows an IndexError (it prints it): `maps` stays None then.
        with torch.enable_grad(), _LowResGradCAM(model=scorer, target_layers=[target_layer]) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(POSITIVE)])
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if maps is None:
        raise ChestDxError("Grad-CAM failed (pytorch-grad-cam reported an IndexError above)")
    low = torch.from_numpy(np.asarray(maps, dtype=np.float32))[:, None]  # (1, 1, d, h, w)
    if low.ndim != 5:
        raise ChestDxError(f"the target layer's output is not a 3D feature map (CAM of shape {tuple(maps.shape)})")
    up = F.interpolate(low, size=tuple(int(s) for s in x.shape[2:]), mode="trilinear", align_corners=False)
    return normalise(up[0, 0].numpy())


# ---------------------------------------------------------------- scores


def attention_shares(heat: np.ndarray, regions: dict) -> dict[str, float]:
    """Share of the (non-negative) map's sum inside each region (`localization.energy_share`);
    NaN for a map that sums to zero. E.g. {"lungs": lung_mask, "labelled_slices": slice_mask}."""
    heat = np.asarray(heat)
    out = {}
    for name, region in regions.items():
        region = np.asarray(region, bool)
        if region.shape != heat.shape:
            raise ChestDxError(f"region {name!r} has shape {region.shape}, the map {heat.shape}")
        out[name] = energy_share(heat, region)
    return out


def localization_3d(heat: np.ndarray, mask: np.ndarray, threshold: float | str = 0.5) -> dict[str, float]:
    """IoU of the thresholded map with the mask, pointing game and energy inside (`localization.localize`).

    The threshold is a fraction of the min-max normalised map (MAG-SD's protocol; for a [0, 1] map
    spanning 0..1 this is heat >= threshold), or "otsu". pointing is 1.0 when a maximal voxel lies in
    the mask. An empty mask gives iou 0, pointing 0 and energy_in 0: leave volumes without a
    reference out of the means.
    """
    heat, mask = np.asarray(heat), np.asarray(mask, bool)
    if heat.shape != mask.shape:
        raise ChestDxError(f"mask has shape {mask.shape}, the map {heat.shape}")
    return localize(heat, mask=mask, threshold=threshold)


def explain_volume(predictor, source, out_dir, name: str, gradcam: bool = True) -> dict:
    """One volume's verdict and its explanations in `out_dir`: the online attention T(A) and (with a
    PyTorch model) 3D Grad-CAM, each as a NIfTI on the patient's coordinates and as axial and coronal
    montages, plus the input as the model saw it (NIfTI) to overlay them on. Returns the verdict with
    `explanations`: {file kind: path}."""
    out_dir = Path(out_dir)
    verdict, shown, out = predictor.predict_volume(source)
    affine = out["grid_affine"]
    spacing = tuple(float(np.linalg.norm(affine[:3, k])) for k in range(3))
    maps = {}
    if "attention" in out:
        maps["attention"] = out["attention"][0]
    if gradcam and predictor.backend == "pytorch":
        x = out["input"]
        members = list(getattr(predictor.model, "members", [predictor.model]))
        cams = [grad_cam_3d(m, x, m.target_layer()) for m in members]
        if len(cams) == 2 and "ensemble_weight" in out:  # Eq. 5's weights, as the attention is combined
            w = float(out["ensemble_weight"])
            maps["gradcam"] = w * cams[0] + (1 - w) * cams[1]
        else:
            maps["gradcam"] = np.mean(cams, axis=0)
    files = {"input_nifti": write_heatmap_nifti(shown, affine, out_dir / f"{name}_input.nii.gz")}
    p = verdict["probabilities"].get(predictor.primary.labels[-1])
    for kind, heat in maps.items():
        label = {"attention": "online attention T(A)", "gradcam": "3D Grad-CAM"}[kind]
        files[f"{kind}_nifti"] = write_heatmap_nifti(heat, affine, out_dir / f"{name}_{kind}.nii.gz")
        for axis in (0, 1):
            title = f"{name}: p({predictor.primary.labels[-1]}) {p:.2f}, {label}, {AXIS_NAMES[axis]}"
            path = out_dir / f"{name}_{kind}_{AXIS_NAMES[axis]}.png"
            files[f"{kind}_{AXIS_NAMES[axis]}_png"] = montage_png(shown, heat, path, title, axis=axis, spacing=spacing)
    verdict["explanations"] = {k: str(v) for k, v in files.items()}
    return verdict
