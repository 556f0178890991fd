"""\"Not a chest image, not a diagnosis\": a check before the model.

A model asked about a blank frame, a holiday photograph or an MR slice still answers with a
probability. `check_input` refuses such inputs with a reason instead, by raising
`NotAChestImage`, a subclass of `InputError`: every caller that already turns an `InputError`
into one clear line keeps working, and the service can answer 422 for this class (every
reason also contains the phrase `NOT_CHEST`, except the statistical rule's, which contains
`UNFAMILIAR`: a real chest CT from another hospital can lie that far from the training images).

Rules that need only the image (they work for every bundle, with or without a reference):

- DICOM `Modality` not read by the model: a CT model reads CT; a radiograph (CXR) model reads
  CR, DX, DR and RG. A missing Modality, OT (other) and SC (secondary capture) say nothing
  about what the picture shows and pass.
- DICOM BodyPartExamined naming no chest region (EXTREMITY, HEAD, ...), where the reader puts it
  in `meta["body_part"]`; missing passes.
- blank: the grey values span less than `BLANK_RANGE` (an all-black 16-bit file is all zeros
  after reading).
- near-constant: standard deviation on the grid below `NEAR_CONSTANT_STD`, or more than
  `MAX_DOMINANT_FRACTION` of the pixels at one grey level.
- too few grey levels (fewer than `MIN_LEVELS` distinct 8-bit levels): a binary or posterised
  picture (a checkerboard, a scanned page in black and white).
- no fine structure: mean |Laplacian| on the grid below `MIN_LAPLACIAN` (a smooth ramp or a
  heavily blurred picture; the 2,407 covid-ct and cxr-covid images are all above 0.011).
- a colour picture: more than `MAX_COLOUR_FRACTION` of the pixels clearly coloured (R, G, B
  spread above `COLOUR_CHROMA`). RGB files with equal channels pass, and so do the coloured
  arrows and boxes that figures of papers carry (up to 21 % of the pixels in COVID-CT).

A statistical rule that needs a reference fitted on the model's training images
(`fit_reference`, kept in the bundle under `REFERENCE_KEY`; `add_input_reference` adds one to a
bundle file). Uniform borders are trimmed, then:

- intensity and texture statistics of the grey image on a `GRID` x `GRID` grid (mean, std,
  percentiles, near-black / near-white fractions, histogram entropy, mean gradient and
  Laplacian magnitude, distinct levels, left-right symmetry), standardised by robust
  per-feature location and scale (median, MAD or the 10-90 % range) and combined into a
  Mahalanobis distance with a shrunk covariance;
- the layout: how far the contrast-normalised `THUMB` x `THUMB` thumbnail lies from the
  subspace of the training thumbnails' first `PCA_COMPONENTS` principal components (the
  residual, as a robust z score).

Each of the two is divided by its 99th percentile over out-of-fold training images (folds by
patient where groups are given) and the larger ratio is the image's distance. The limit is the
(1 - `REFUSED_SHARE`) quantile of the out-of-fold distances, so about 0.3 % of training images
would be refused, but at most Q90 + `TAIL_FACTOR` (Q90 - Q50) of them: with a few dozen
images that quantile is the largest distance, and one odd training image would otherwise set
a limit nothing reaches (on the full covid-ct and cxr-covid train splits the quantile is the
smaller of the two). Out of fold, because a model of the images it was fitted on calls them
closer than new images of the same kind. A reference of a few dozen images is a rough one (it
does not cover a dataset's variety, and its limit moves from draw to draw): fit it on the
whole training split.

The statistics are taken on the image as read (`LoadedImage.pixels` in [0, 1], a DICOM CT
already in the model's HU window), not after the model's own resizing or CLAHE, so a reference
does not depend on those settings.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from chestdx.errors import InputError

REFERENCE_KEY = "input_reference"
REFERENCE_FORMAT = "chestdx-input-reference-v1"
NOT_CHEST = "not a chest image"  # in every refusal reason of the rules that need only the image
UNFAMILIAR = "this model cannot be trusted on it"  # in the reason of the statistical rule

GRID = 128  # the (trimmed) grey image is area-resized to GRID x GRID for the statistics
THUMB = 16  # and to THUMB x THUMB for the layout
STRIDE_SIDE = 512  # full-resolution measures (levels, colour, range) on at most ~this many pixels a side
BLACK, WHITE = 0.02, 0.98  # near-black / near-white levels
HIST_BINS = 64
BORDER_STD, BORDER_DARK, BORDER_BRIGHT = 0.02, 0.06, 0.94  # a uniform dark or bright border row/column

BLANK_RANGE = 1.5 / 255
NEAR_CONSTANT_STD = 0.01
MAX_DOMINANT_FRACTION = 0.97
MIN_LEVELS = 8
MIN_LAPLACIAN = 0.003  # mean |Laplacian| on the grid below this: no fine structure (real images: >= 0.011)
COLOUR_CHROMA = 0.12
MAX_COLOUR_FRACTION = 0.30

PCA_COMPONENTS = 6
REFUSED_SHARE = 0.003
TAIL_FACTOR = 1.75  # the limit is at most Q90 + TAIL_FACTOR * (Q90 - Q50) of the out-of-fold distances
COMPONENT_QUANTILE = 0.99
FOLDS = 5
SHRINKAGE = 0.1
TRIM = 0.05  # the covariance is estimated without the 5 % of training images farthest from the median
SCALE_FLOOR = 0.02
Z_CLIP = 8.0

STAT_FEATURES = ("mean", "std", "p01", "p05", "p25", "p50", "p75", "p95", "p99", "black_fraction",
                 "white_fraction", "entropy", "gradient", "laplacian", "levels", "symmetry")

# DICOM BodyPartExamined (read where `LoadedImage.meta["body_part"]` carries it): a value that names
# none of these is not a chest image. Missing or empty passes; so do whole-body and trunk values.
CHEST_BODY_PARTS = ("CHEST", "THORAX", "THORAC", "TORAX", "LUNG", "PULM", "BODY", "TRUNK", "TORSO")
ACCEPTED_MODALITIES = {"CT": ("CT",), "CXR": ("CR", "DX", "DR", "RG")}
PASSING_MODALITIES = ("", "OT", "SC")
MODALITY_WORDS = {"CT": "CT slices", "CXR": "chest radiographs"}
MODALITY_NOUN = {"CT": "a CT slice", "CXR": "a radiograph"}


class NotAChestImage(InputError):
    """An input the model must not be asked about. `rule`: the check that refused it (modality, body_part,
    blank, near_constant, levels, smooth, colour, statistics); `details`: its numbers."""

    def __init__(self, path, reason: str, rule: str, details: dict | None = None):
        self.rule = rule
        self.details = details or {}
        super().__init__(path, reason)


# ---------------------------------------------------------------------------------------------
# Measuring one image


def _frame(pixels: np.ndarray, meta: dict) -> np.ndarray:
    """One 2D grey or (H, W, 3) frame: the middle frame of a multi-frame DICOM."""
    pixels = np.asarray(pixels, dtype=np.float32)
    frames = int(meta.get("frames", 1) or 1)
    if frames > 1 and pixels.ndim >= 3 and pixels.shape[0] == frames:
        pixels = pixels[frames // 2]
    return pixels


def _gray(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        return pixels[..., 0]
    raise ValueError(f"expected a 2D grey or (H, W, 3) colour image, got shape {pixels.shape}")


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    import cv2

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    h, w = arr.shape[:2]
    return cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA if min(h, w) >= size else cv2.INTER_LINEAR)


def _strided(arr: np.ndarray) -> np.ndarray:
    step = max(1, int(math.ceil(max(arr.shape[:2]) / STRIDE_SIDE)))
    return arr[::step, ::step]


def _trim(gray: np.ndarray) -> np.ndarray:
    """`gray` without leading and trailing uniform dark or bright rows and columns (padding, black
    bars); unchanged where that would leave fewer than 16 pixels a side."""
    def keep(axis):
        mean, std = gray.mean(axis=axis), gray.std(axis=axis)
        full = ~((std < BORDER_STD) & ((mean < BORDER_DARK) | (mean > BORDER_BRIGHT)))
        idx = np.flatnonzero(full)
        return (idx[0], idx[-1] + 1) if idx.size else (0, 0)

    r0, r1 = keep(1)
    c0, c1 = keep(0)
    if r1 - r0 < 16 or c1 - c0 < 16:
        return gray
    return gray[r0:r1, c0:c1]


def colour_fraction(pixels: np.ndarray) -> float:
    """The share of clearly coloured pixels (max - min over R, G, B above `COLOUR_CHROMA`); 0 for a
    grey image and for an RGB file with equal channels."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        return 0.0
    small = _strided(pixels)
    r, g, b = small[..., 0], small[..., 1], small[..., 2]  # (not max(axis=-1): 20x slower on a 3-long axis)
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float((chroma > COLOUR_CHROMA).mean())


def _normalise_rows(t: np.ndarray) -> np.ndarray:
    t = t - t.mean(axis=-1, keepdims=True)
    return t / np.maximum(t.std(axis=-1, keepdims=True), 1e-3)


def measure(pixels: np.ndarray, meta: dict | None = None) -> dict:
    """Everything the checks read from one image (`LoadedImage.pixels`, its `meta` for multi-frame
    DICOM): the scalar statistics (`STAT_FEATURES`; the rule measures range, levels,
    dominant_fraction, colour_fraction, grid_std on the untrimmed image) and `thumbnail`, the
    contrast-normalised THUMB x THUMB layout of the trimmed image (float32, flattened)."""
    pixels = _frame(pixels, meta or {})
    gray = np.clip(_gray(pixels), 0.0, 1.0)
    full = _strided(gray)
    q = np.round(full * 255).astype(np.uint8)
    counts = np.bincount(q.ravel(), minlength=256)
    out = {
        "range": float(full.max() - full.min()),
        "levels": float(np.count_nonzero(counts)),
        "dominant_fraction": float(counts.max() / q.size),
        "colour_fraction": colour_fraction(pixels),
        "grid_std": float(_resize(gray, GRID).std()),
    }
    small = np.clip(_resize(_trim(full), GRID), 0.0, 1.0)
    flat = small.ravel()
    p = np.percentile(flat, [1, 5, 25, 50, 75, 95, 99])
    hist = np.bincount(np.minimum((flat * HIST_BINS).astype(np.int64), HIST_BINS - 1), minlength=HIST_BINS)
    prob = hist[hist > 0] / flat.size
    gy, gx = np.gradient(small)
    lap = 4 * small[1:-1, 1:-1] - small[:-2, 1:-1] - small[2:, 1:-1] - small[1:-1, :-2] - small[1:-1, 2:]
    thumb = _resize(small, THUMB)
    a, b = _normalise_rows(thumb.ravel()), _normalise_rows(thumb[:, ::-1].ravel())
    out.update({
        "mean": float(flat.mean()), "std": float(flat.std()),
        "p01": float(p[0]), "p05": float(p[1]), "p25": float(p[2]), "p50": float(p[3]),
        "p75": float(p[4]), "p95": float(p[5]), "p99": float(p[6]),
        "black_fraction": float((flat < BLACK).mean()), "white_fraction": float((flat > WHITE).mean()),
        "entropy": float(-(prob * np.log2(prob)).sum()),
        "gradient": float(np.hypot(gx, gy).mean()), "laplacian": float(np.abs(lap).mean()),
        "symmetry": float((a * b).mean()),
        "thumbnail": a.astype(np.float32),
    })
    return out


def _as_pixels_meta(image):
    if hasattr(image, "pixels"):
        return image.pixels, image.meta
    if isinstance(image, dict) and "thumbnail" in image:
        return None, image  # already measured
    return np.asarray(image, dtype=np.float32), {}


def _measured(image) -> dict:
    pixels, meta = _as_pixels_meta(image)
    return meta if pixels is None else measure(pixels, meta)


# ---------------------------------------------------------------------------------------------
# The reference


def _stat_matrix(measures: list[dict]) -> np.ndarray:
    """The statistics as model features: fractions square-rooted, gradients logged, levels / 256."""
    X = np.array([[m[k] for k in STAT_FEATURES] for m in measures], dtype=np.float64)
    for j, name in enumerate(STAT_FEATURES):
        if name.endswith("fraction"):
            X[:, j] = np.sqrt(X[:, j])
        elif name in ("gradient", "laplacian"):
            X[:, j] = np.log(X[:, j] + 1e-4)
        elif name == "levels":
            X[:, j] = X[:, j] / 256.0
    return X


def _robust_scale(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    med = np.median(X, axis=0)
    mad = 1.4826 * np.median(np.abs(X - med), axis=0)
    spread = (np.percentile(X, 90, axis=0) - np.percentile(X, 10, axis=0)) / 2.563
    return med, np.maximum(np.maximum(mad, spread), SCALE_FLOOR)


def _fit_core(measures: list[dict]) -> dict:
    X = _stat_matrix(measures)
    loc, scale = _robust_scale(X)
    Z = np.clip((X - loc) / scale, -Z_CLIP, Z_CLIP)
    norms = np.linalg.norm(Z, axis=1)
    kept = Z[norms <= np.quantile(norms, 1 - TRIM)]
    cov = np.cov(kept.T) if len(kept) > 2 else np.eye(Z.shape[1])
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * np.eye(Z.shape[1]) * float(np.mean(np.diag(cov)))
    thumbs = np.array([m["thumbnail"] for m in measures], dtype=np.float64)
    mean = thumbs.mean(axis=0)
    k = max(1, min(PCA_COMPONENTS, len(thumbs) - 1))
    _, _, vt = np.linalg.svd(thumbs - mean, full_matrices=False)
    core = {"location": loc, "scale": scale, "precision": np.linalg.inv(cov),
            "thumb_mean": mean, "components": vt[:k]}
    resid = np.log(_residual(core, thumbs))
    r_loc, r_scale = _robust_scale(resid[:, None])
    core.update(residual_location=float(r_loc[0]), residual_scale=float(r_scale[0]))
    return core


def _residual(core: dict, thumbs: np.ndarray) -> np.ndarray:
    centred = thumbs - core["thumb_mean"]
    coef = centred @ core["components"].T
    return np.maximum(((centred - coef @ core["components"]) ** 2).mean(axis=1), 1e-6)


def _components(core: dict, measures: list[dict]) -> np.ndarray:
    """(N, 2): the statistics' Mahalanobis distance (per feature, RMS) and the layout residual's z."""
    Z = np.clip((_stat_matrix(measures) - core["location"]) / core["scale"], -Z_CLIP, Z_CLIP)
    maha = np.sqrt(np.einsum("ij,jk,ik->i", Z, core["precision"], Z) / Z.shape[1])
    thumbs = np.array([m["thumbnail"] for m in measures], dtype=np.float64)
    rz = (np.log(_residual(core, thumbs)) - core["residual_location"]) / core["residual_scale"]
    return np.column_stack([maha, rz])


def _folds(n: int, groups, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = np.asarray(groups).astype(str) if groups is not None else np.arange(n).astype(str)
    unique = np.unique(keys)
    rng.shuffle(unique)
    fold_of = {g: i % folds for i, g in enumerate(unique)}
    return np.array([fold_of[g] for g in keys])


def fit_reference(images, modality: str | None = None, groups=None, folds: int = FOLDS,
                  refused_share: float = REFUSED_SHARE, seed: int = 0) -> dict:
    """The reference of a model's training images (`LoadedImage`s, [0, 1] arrays or `measure`
    results): JSON-serialisable, a few kB. `groups` (e.g. patient ids, one per image) keeps a
    patient's images in one fold when the limit is chosen out of fold. `modality` ("CT", "CXR")
    names the images in refusal reasons."""
    measures = [_measured(im) for im in images]
    n = len(measures)
    if n < 2 * folds:
        raise ValueError(f"fit_reference needs at least {2 * folds} images, got {n}")
    fold = _folds(n, groups, folds, seed)
    oof = np.zeros((n, 2))
    for f in range(folds):
        held = fold == f
        if held.any() and (~held).sum() > 2:
            core = _fit_core([m for m, h in zip(measures, held) if not h])
            oof[held] = _components(core, [m for m, h in zip(measures, held) if h])
    component_scale = np.maximum(np.quantile(oof, COMPONENT_QUANTILE, axis=0), 1e-6)
    distance = (oof / component_scale).max(axis=1)
    empirical = float(np.quantile(distance, 1 - refused_share))
    q50, q90 = np.quantile(distance, [0.5, 0.9])
    extrapolated = float(q90 + TAIL_FACTOR * (q90 - q50))
    limit = min(empirical, extrapolated)
    core = _fit_core(measures)
    return {
        "format": REFERENCE_FORMAT,
        "modality": modality,
        "n_images": n,
        "folds": folds,
        "grouped": groups is not None,
        "features": list(STAT_FEATURES),
        "location": _round(core["location"]),
        "scale": _round(core["scale"]),
        "precision": _round(core["precision"]),
        "thumbnail": THUMB,
        "grid": GRID,
        "thumb_mean": _round(core["thumb_mean"]),
        "components": _round(core["components"]),
        "residual_location": _round(core["residual_location"]),
        "residual_scale": _round(core["residual_scale"]),
        "component_scale": _round(component_scale),
        "limit": _round(limit),
        "limit_empirical": _round(empirical),
        "limit_extrapolated": _round(extrapolated),
        "refused_share": refused_share,
        "oof_refused": int((distance > limit).sum()),
        "oof_distance_quantiles": {q: _round(float(np.quantile(distance, float(q))))
                                   for q in ("0.5", "0.9", "0.99", "0.997")},
    }


def _round(x, digits: int = 6):
    if isinstance(x, np.ndarray):
        return [_round(v, digits) for v in x.tolist()]
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return float(f"{float(x):.{digits}g}")


def _core_of(reference: dict) -> dict:
    if reference.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"not an input reference (expected format {REFERENCE_FORMAT})")
    core = {k: np.asarray(reference[k], dtype=np.float64)
            for k in ("location", "scale", "precision", "thumb_mean", "components", "component_scale")}
    core.update(residual_location=float(reference["residual_location"]),
                residual_scale=float(reference["residual_scale"]))
    return core


def reference_distance(image, reference: dict) -> dict:
    """{"distance", "limit", "statistics", "layout"}: the image's distance from the reference (the
    larger of its statistics and layout components, each in units of its training 99th percentile)."""
    m = _measured(image)
    core = _core_of(reference)
    maha, rz = _components(core, [m])[0]
    stats, layout = maha / core["component_scale"][0], rz / core["component_scale"][1]
    return {"distance": float(max(stats, layout)), "limit": float(reference["limit"]),
            "statistics": float(stats), "layout": float(layout)}


# ---------------------------------------------------------------------------------------------
# The check


def _refuse(label, what: str, rule: str, why: str = NOT_CHEST, **details):
    raise NotAChestImage(label, f"{what}: {why}", rule, details)


def check_modality(meta: dict, modality: str | None, label) -> None:
    """Refuses a DICOM whose Modality the model does not read (see the module docstring)."""
    if meta.get("format") != "dicom" or not modality or modality not in ACCEPTED_MODALITIES:
        return
    code = str(meta.get("modality") or "").strip().upper()
    if code in PASSING_MODALITIES or code in ACCEPTED_MODALITIES[modality]:
        return
    reads = "/".join(ACCEPTED_MODALITIES[modality])
    _refuse(label, f"DICOM modality {code}; this model reads {reads} ({MODALITY_WORDS[modality]})",
            "modality", dicom_modality=code, model_modality=modality)


def check_body_part(meta: dict, label) -> None:
    """Refuses a DICOM whose BodyPartExamined (`meta["body_part"]`) names no chest region."""
    part = str(meta.get("body_part") or "").strip().upper()
    if meta.get("format") != "dicom" or not part or any(word in part for word in CHEST_BODY_PARTS):
        return
    _refuse(label, f"DICOM body part {part}, not the chest", "body_part", body_part=part)


def check_input(image, reference: dict | None = None, modality: str | None = None,
                refuse_unfamiliar: bool = True) -> dict | None:
    """Raise `NotAChestImage` (an `InputError`) when `image` (a `LoadedImage`) is not something
    the model should be asked about. `reference`: the bundle's `REFERENCE_KEY` entry, or None
    (then only the rules that need no reference run, and None is returned). `modality`: the
    bundle's "modality" ("CT" or "CXR"; default the reference's). Returns the image's
    `reference_distance` with "unfamiliar" (over the limit); `refuse_unfamiliar=False` returns
    it for such an image instead of refusing it (the other rules still refuse)."""
    meta = getattr(image, "meta", {}) or {}
    modality = modality or (reference or {}).get("modality")
    check_modality(meta, modality, meta.get("path", "<image>"))
    check_body_part(meta, meta.get("path", "<image>"))
    return check_measures(measure(image.pixels, meta), meta, reference, modality, refuse_unfamiliar)


def check_measures(m: dict, meta: dict, reference: dict | None = None, modality: str | None = None,
                   refuse_unfamiliar: bool = True) -> dict | None:
    """`check_input` on an image already measured (`measure`), without the DICOM header rules."""
    label = meta.get("path", "<image>")
    modality = modality or (reference or {}).get("modality")
    if m["range"] < BLANK_RANGE:
        _refuse(label, "looks blank (constant intensity)", "blank", range=m["range"])
    if m["grid_std"] < NEAR_CONSTANT_STD or m["dominant_fraction"] > MAX_DOMINANT_FRACTION:
        _refuse(label, f"nearly constant intensity ({m['dominant_fraction']:.0%} of the pixels at one grey level, "
                       f"std {m['grid_std']:.3f})", "near_constant",
                dominant_fraction=m["dominant_fraction"], std=m["grid_std"])
    if m["levels"] < MIN_LEVELS:
        _refuse(label, f"only {int(m['levels'])} grey levels (a binary or posterised picture)", "levels",
                levels=int(m["levels"]))
    if m["laplacian"] < MIN_LAPLACIAN:
        _refuse(label, f"no fine structure (a smooth gradient or a heavily blurred picture; detail "
                       f"{m['laplacian']:.4f}, real images have at least {MIN_LAPLACIAN})", "smooth",
                laplacian=m["laplacian"])
    if m["colour_fraction"] > MAX_COLOUR_FRACTION:
        noun = MODALITY_NOUN.get(modality, "a CT slice or radiograph")
        _refuse(label, f"a colour picture ({m['colour_fraction']:.0%} of the pixels coloured), not {noun}",
                "colour", colour_fraction=m["colour_fraction"])
    if not reference:
        return None
    d = reference_distance(m, reference)
    d["unfamiliar"] = d["distance"] > d["limit"]
    if d["unfamiliar"] and refuse_unfamiliar:
        seen = MODALITY_WORDS.get(modality or "", "images")
        _refuse(label, f"intensity and layout statistics far outside the {seen} this model was trained on "
                       f"(distance {d['distance']:.2f}, limit {d['limit']:.2f})", "statistics", UNFAMILIAR, **d)
    return d


def input_reference(bundle: dict) -> dict | None:
    """The bundle's reference, or None (a bundle made before references, or without one)."""
    ref = bundle.get(REFERENCE_KEY)
    return ref if isinstance(ref, dict) and ref.get("format") == REFERENCE_FORMAT else None


# ---------------------------------------------------------------------------------------------
# Fitting from a manifest and storing in a bundle


def manifest_images(manifest, split: str | None = "train", max_images: int | None = None, seed: int = 0,
                    hu_window=None):
    """(LoadedImages, patient ids) of a manifest's split, at most `max_images` drawn at random."""
    from chestdx.data.io import read_image

    m = manifest.subset(split) if split else manifest
    index = np.arange(len(m))
    if max_images is not None and len(m) > max_images:
        index = np.sort(np.random.default_rng(seed).choice(len(m), size=max_images, replace=False))
    paths = m.paths()
    patients = m.patients()
    return [read_image(paths[i], hu_window=hu_window) for i in index], [patients[i] for i in index]


def fit_manifest_reference(manifest, modality: str | None = None, split: str | None = "train",
                           max_images: int | None = None, seed: int = 0, hu_window=None) -> dict:
    """`fit_reference` on a manifest's training split, folds by patient."""
    images, patients = manifest_images(manifest, split, max_images, seed, hu_window)
    return fit_reference(images, modality=modality, groups=patients, seed=seed)


def add_input_reference(bundle_path, images=None, reference: dict | None = None, groups=None) -> dict:
    """Store a reference in a bundle file (fitted from `images`, or given), rewritten atomically.
    Returns the reference. The bundle's other keys, weights included, are kept as they are."""
    import torch

    from chestdx.models.bundle import save_bundle

    path = Path(bundle_path)
    bundle = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(bundle, dict) or "state_dict" not in bundle:
        raise ValueError(f"{path}: not a chestdx model bundle")
    if reference is None:
        if images is None:
            raise ValueError("give images or a reference")
        reference = fit_reference(images, modality=bundle.get("modality"), groups=groups)
    bundle[REFERENCE_KEY] = reference
    save_bundle(bundle, path)
    return reference
