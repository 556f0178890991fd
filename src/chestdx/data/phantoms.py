"""Synthetic chest CT phantoms with infections whose size and place are known.

No public set of COVID-19 and community-acquired pneumonia (CAP) volumes with infection masks fits
this workplace, so the dual-sampling reproduction (Ouyang et al., TMI 2020) runs on phantoms: a body
(soft tissue, spine), two lungs at about -850 HU with vessels, outside air, CT-like noise, and
"infections" (ground-glass blobs) drawn the way the paper describes the two classes (Sec. I, IV-A):
COVID-19 mostly larger, peripheral and bilateral; CAP mostly smaller, unilateral and denser. The
classes overlap in every property (size, side count, density), so the task is not solved by one
threshold, and the infection-to-lung ratio spans all four size groups of the size-balanced sampler.
Each phantom is written as NIfTI (int16 HU; uint8 infection and lung masks) with a manifest row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from chestdx.data.lungs3d import infection_ratio

SHAPE = (48, 96, 96)  # (D, H, W) voxels
SPACING = (5.0, 3.5, 3.5)  # mm, slice axis first
# log-uniform infection-to-lung ratios; the groups split at 0.030 (COVID) and 0.001 (CAP)
RATIO_RANGE = {"covid": (0.006, 0.25), "cap": (0.0001, 0.01)}  # targets; blobs cut by the pleura end smaller
BILATERAL_P = {"covid": 0.8, "cap": 0.2}
PERIPHERAL_P = {"covid": 0.8, "cap": 0.3}
HU_RANGE = {"covid": (-650.0, -350.0), "cap": (-450.0, -100.0)}  # ground glass vs denser
BLOBS = {"covid": (2, 6), "cap": (1, 3)}  # blobs per phantom, inclusive
VERSION = 1  # bump when the drawing changes: folders made by another version are remade


@dataclass
class Phantom:
    hu: np.ndarray  # (D, H, W) float32 HU
    lungs: np.ndarray  # uint8, infection included
    infection: np.ndarray  # uint8
    ratio: float  # infection / lung volume
    label: str
    spacing: tuple
    affine: np.ndarray  # (d, h, w) index -> mm


def make_phantom(label: str, rng: np.random.Generator, shape=SHAPE, spacing=SPACING) -> Phantom:
    if label not in RATIO_RANGE:
        raise ValueError(f"phantom label must be one of {sorted(RATIO_RANGE)}, got {label!r}")
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    mm = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    z, y, x = mm  # mm from the centre: z cranio-caudal, y antero-posterior, x left-right
    half = [n * s / 2 for n, s in zip(shape, spacing)]
    jitter = lambda: rng.uniform(0.9, 1.1)  # noqa: E731 - one draw per call

    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (x / (0.86 * half[2] * jitter())) ** 2 + (y / (0.62 * half[1] * jitter())) ** 2 <= 1
    hu[body] = 40.0
    spine = ((x / 18.0) ** 2 + ((y - 0.45 * half[1]) / 16.0) ** 2) <= 1
    hu[spine & body] = 450.0
    lungs = np.zeros(shape, dtype=bool)
    axes = []
    for side in (-1, 1):
        a = np.array([0.80 * half[0], 0.40 * half[1], 0.30 * half[2]]) * [jitter(), jitter(), jitter()]
        c = np.array([rng.uniform(-0.05, 0.05) * half[0], -0.05 * half[1], side * 0.42 * half[2]])
        lung = ((z - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((x - c[2]) / a[2]) ** 2 <= 1
        lungs |= lung
        axes.append(lung)
    hu[lungs] = -850.0
    _add_vessels(hu, lungs, rng, spacing)

    infection = np.zeros(shape, dtype=bool)
    target = np.exp(rng.uniform(*np.log(RATIO_RANGE[label])))
    sides = [0, 1] if rng.random() < BILATERAL_P[label] else [int(rng.integers(2))]
    n_blobs = int(rng.integers(BLOBS[label][0], BLOBS[label][1] + 1))
    n_blobs = max(n_blobs, len(sides))
    volume_each = target * lungs.sum() * np.prod(spacing) / n_blobs  # mm^3
    depth = ndimage.distance_transform_edt(lungs, sampling=spacing)
    blob_hu = rng.uniform(*HU_RANGE[label])
    for b in range(n_blobs):
        lung = axes[sides[b % len(sides)]]
        peripheral = rng.random() < PERIPHERAL_P[label]
        radius = (3 * volume_each / (4 * np.pi)) ** (1 / 3)
        centre = _blob_centre(lung, depth, radius, peripheral, rng, mm)
        stretch = rng.uniform(0.7, 1.4, size=3)
        stretch /= np.prod(stretch) ** (1 / 3)  # same volume, another shape
        r = sum(((g - c) / (radius * s)) ** 2 for g, c, s in zip(mm, centre, stretch))
        infection |= (r <= 1) & lung
    hu[infection] = blob_hu + rng.normal(0, 40, size=int(infection.sum()))
    hu = ndimage.gaussian_filter(hu, sigma=0.6) + rng.normal(0, 20, size=shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    ratio = infection_ratio(infection, lungs) if infection.any() else 0.0
    return Phantom(hu.astype(np.float32), lungs.astype(np.uint8), infection.astype(np.uint8), ratio, label,
                   spacing, affine)


def _add_vessels(hu: np.ndarray, lungs: np.ndarray, rng: np.random.Generator, spacing) -> None:
    """Small bright spots and short tubes in the lungs: lung is not one flat grey."""
    seeds = np.zeros(lungs.shape, dtype=bool)
    idx = np.flatnonzero(lungs)
    seeds.flat[rng.choice(idx, size=max(1, idx.size // 400), replace=False)] = True
    vessels = ndimage.binary_dilation(seeds, iterations=1) & lungs
    hu[vessels] = rng.uniform(-100, 40)


def _blob_centre(lung, depth, radius, peripheral, rng, mm):
    """A voxel of the lung: near the pleura (peripheral) or deeper than the blob's radius."""
    d = depth[lung]
    deep = d.max()
    if peripheral:
        choose = d <= max(0.5 * radius, 0.15 * deep)
    else:
        choose = d >= min(radius, 0.6 * deep)
    candidates = np.flatnonzero(lung)[choose] if choose.any() else np.flatnonzero(lung)
    i = np.unravel_index(rng.choice(candidates), lung.shape)
    return [g[i] for g in mm]


def write_phantoms(folder, n: int = 300, seed: int = 0, shape=SHAPE, spacing=SPACING,
                   splits=(0.6, 0.2, 0.2)) -> Path:
    """Write `n` phantoms (half COVID, half CAP) and their manifest under `folder`; returns the
    manifest path. Deterministic in (n, seed, shape, spacing, splits); a folder made with the same
    settings is reused (the settings are written last, so a killed run is redone)."""
    from chestdx.data.volumes import write_nifti
    from chestdx.models.dsan import size_groups
    from chestdx.utils import write_json_atomic, write_text_atomic

    import pandas as pd

    folder = Path(folder)
    settings = {"version": VERSION, "n": int(n), "seed": int(seed), "shape": list(map(int, shape)),
                "spacing": list(map(float, spacing)), "splits": list(map(float, splits))}
    manifest = folder / "manifest.csv"
    settings_file = folder / "phantoms.json"
    if manifest.is_file() and settings_file.is_file() and json.loads(settings_file.read_text()) == settings:
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.array(["covid", "cap"] * (n // 2) + ["covid"] * (n % 2))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    cut = np.cumsum(np.round(np.asarray(splits) / sum(splits) * n).astype(int))[:-1]
    split = np.empty(n, dtype=object)
    for name, part in zip(("train", "val", "test"), np.split(order, cut)):
        split[part] = name
    rows = []
    for i in range(n):
        ph = make_phantom(labels[i], np.random.default_rng([seed, i]), shape, spacing)
        stem = f"phantom_{i:04d}"
        paths = {key: f"{key}/{stem}.nii.gz" for key in ("images", "masks", "lungs")}
        write_nifti(np.round(ph.hu), ph.affine, folder / paths["images"], np.int16)
        write_nifti(ph.infection, ph.affine, folder / paths["masks"], np.uint8)
        write_nifti(ph.lungs, ph.affine, folder / paths["lungs"], np.uint8)
        rows.append({"path": paths["images"], "mask": paths["masks"], "lung_mask": paths["lungs"],
                     "label": ph.label, "patient_id": stem, "split": split[i],
                     "infection_ratio": round(ph.ratio, 6), "source": "phantom"})
    frame = pd.DataFrame(rows)
    groups = size_groups(frame["infection_ratio"].to_numpy(), (frame["label"] == "covid").to_numpy())
    frame["size_group"] = np.array(["covid_small", "covid_large", "cap_small", "cap_large"])[groups]
    write_text_atomic(manifest, frame.to_csv(index=False))
    write_json_atomic(settings_file, settings)
    return manifest
