"""Preprocessing and augmentation steps from the papers: keyed, channel-first, seeded, 2D or 3D.

A sample is a dict. `image` is float32 channel-first, (C, H, W) or (C, D, H, W); an optional
`mask` (1, *spatial), uint8 or float, must follow the image through every geometric step; any
other key passes through untouched. Every step is called as `step(sample, rng) -> dict` with a
numpy Generator (deterministic steps ignore it) and returns a new dict, never changing the one it
was given, so a cached load-time sample can be augmented again each epoch. `step.keys` names the
fields it may touch: geometric steps default to ("image", "mask") and touch those present,
intensity steps touch "image" only.

`spatial_dims` (2 or 3) is given to `build_pipeline` and to every geometric step; nothing guesses
it from an array's shape, because (C, H, W) and (D, H, W) look alike. A geometric step draws its
random parameters once per call and applies them to every key: the image interpolated linearly and
padded with its border intensity, the mask by nearest neighbour and padded with 0, so a binary mask
stays binary and in register with the image.

A slice sequence (the ResNet50-ATT2 setting, one augmentation for the whole sequence) is passed as
a 2D sample with the sequence on the channel axis, (T, H, W) with spatial_dims=2: every 2D step
applies one draw to all T slices (CLAHE and JPEG work slice by slice, ZScore uses one mean and std
for the sequence); the caller moves the axis back afterwards. It is not a volume: a 3D affine would
shear across slices that need not be adjacent.

Replay: for a 2D sample with one channel, every step gives bit-for-bit the output of the
earlier (H, W) implementation and draws the same numbers from rng in the same order, so seeds of
published runs still replay. 2D geometry stays on OpenCV for that reason; 3D geometry uses MONAI's
array transforms (imported only when a 3D step runs, since the import takes seconds).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from chestdx.errors import ChestDxError

SPATIAL_KEYS = ("image", "mask")
NEAREST_KEYS = ("mask",)


def _dims(spatial_dims) -> int:
    if spatial_dims not in (2, 3):
        raise ChestDxError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def _only_2d(name: str, spatial_dims, why: str) -> int:
    if _dims(spatial_dims) != 2:
        raise ChestDxError(f"{name} is 2D-only ({why}); remove it from the config for spatial_dims=3")
    return 2


def _check_sample(sample, who: str) -> None:
    if not isinstance(sample, dict) or "image" not in sample:
        raise ChestDxError(f"{who}: a sample is a dict with an 'image' array (C, *spatial), "
                           f"got {type(sample).__name__}")


def _spatial_fields(sample, keys, spatial_dims: int, who: str) -> list:
    """The keys present, after checking each is (C, *spatial) with the image's spatial shape."""
    _check_sample(sample, who)
    present = [k for k in keys if k in sample]
    ref = sample["image"].shape[1:]
    for k in present:
        shape = sample[k].shape
        if len(shape) != spatial_dims + 1:
            raise ChestDxError(f"{who}: '{k}' must be (C, {'D, ' if spatial_dims == 3 else ''}H, W) for "
                               f"spatial_dims={spatial_dims}, got shape {tuple(shape)}")
        if shape[1:] != ref:
            raise ChestDxError(f"{who}: '{k}' has spatial shape {tuple(shape[1:])}, the image {tuple(ref)}")
    return present


def _border_median(x: np.ndarray) -> float:
    """Median over the first and last index of every axis: the edges (2D) or faces (3D)."""
    faces = [np.take(x, i, axis=a).ravel() for a in range(x.ndim) for i in (0, -1)]
    return float(np.median(np.concatenate(faces)))


def _place_centre(x: np.ndarray, target, fill, dtype) -> np.ndarray:
    """x centred on a `target` canvas of `fill`; an odd margin leaves the extra row at the end."""
    out = np.full(tuple(target), fill, dtype=dtype)
    where = tuple(slice((t - n) // 2, (t - n) // 2 + n) for t, n in zip(target, x.shape))
    out[where] = x
    return out


def _per_channel(x: np.ndarray, fn) -> np.ndarray:
    return np.stack([fn(c) for c in x])


def _to_float(x: np.ndarray) -> np.ndarray:
    """Masks go through OpenCV and MONAI as float32 (bool and int64 are refused there)."""
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _to_numpy(t) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t))


class Compose:
    """Steps applied in order; `steps` is a plain list so callers can splice in their own."""

    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        _check_sample(sample, "Compose")
        rng = rng if rng is not None else np.random.default_rng(0)
        sample = dict(sample)
        for step in self.steps:
            sample = step(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(s).__name__ for s in self.steps) + ")"


class Resize:
    """Resize to `size` (an int for a square or cube, or one size per spatial axis).

    `keep_aspect` scales by the tightest axis and pads with the image's border median (mask: 0),
    centred. 2D uses OpenCV (area when shrinking, else bilinear); 3D uses MONAI's Resize
    (trilinear with Gaussian anti-aliasing on the axes that shrink, as CT slices are often thick
    along one axis and thin along the others). Masks: nearest neighbour.
    """

    def __init__(self, size, keep_aspect: bool = True, spatial_dims: int = 2, keys=SPATIAL_KEYS,
                 nearest=NEAREST_KEYS):
        self.spatial_dims = _dims(spatial_dims)
        self.size, self.keep_aspect = size, keep_aspect
        self.target = ((int(size),) * self.spatial_dims if np.isscalar(size) else tuple(int(s) for s in size))
        if len(self.target) != self.spatial_dims:
            raise ChestDxError(f"Resize: size {size!r} does not have {self.spatial_dims} entries")
        self.keys, self.nearest = tuple(keys), tuple(nearest)

    def __call__(self, sample, rng=None):
        present = _spatial_fields(sample, self.keys, self.spatial_dims, "Resize")
        out = dict(sample)
        for k in present:
            out[k] = self._resize(sample[k], linear=k not in self.nearest)
        return out

    def _fitted(self, shape):
        if not self.keep_aspect:
            return self.target
        scale = min(t / n for t, n in zip(self.target, shape))
        return tuple(max(1, round(n * scale)) for n in shape)

    def _resize(self, x, linear):
        shape = x.shape[1:]
        fitted = self._fitted(shape)
        if self.spatial_dims == 2:
            shrink = any(n > t for n, t in zip(shape, self.target))
            flag = (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR) if linear else cv2.INTER_NEAREST_EXACT
            channels = x if linear else _to_float(x)
            resized = _per_channel(channels, lambda c: cv2.resize(c, fitted[::-1], interpolation=flag))
        else:
            from monai.transforms import Resize as MonaiResize

            mode = "trilinear" if linear else "nearest-exact"
            resized = _to_numpy(MonaiResize(fitted, mode=mode, anti_aliasing=linear)(
                torch.from_numpy(np.ascontiguousarray(_to_float(x)))))
        if not linear:
            resized = resized.astype(x.dtype)
        if fitted == self.target:
            return resized
        dtype = np.float32 if linear else x.dtype
        return np.stack([_place_centre(r, self.target, _border_median(c) if linear else 0, dtype)
                         for r, c in zip(resized, x)])


class LungMask:
    """Everything outside the lungs set to 0 (`chestdx.explain.lungs.ct_lung_mask`, classical, the
    mask closed by `dilate` px at 256 px so pleural lesions stay in), slice by slice; a slice whose
    lungs cover under `min_fraction` of it is left as it is (no lungs found: not blanked). Image only. 2D."""

    def __init__(self, min_fraction: float = 0.02, dilate: int = 5, spatial_dims: int = 2, keys=("image",)):
        self.spatial_dims = _only_2d("LungMask", spatial_dims, "the lung mask is found slice by slice")
        self.min_fraction, self.dilate, self.keys = float(min_fraction), int(dilate), tuple(keys)

    def mask(self, gray: np.ndarray) -> np.ndarray | None:
        from chestdx.explain.lungs import ct_lung_mask

        mask = ct_lung_mask(gray)
        if mask.mean() < self.min_fraction:
            return None
        radius = max(1, round(self.dilate * max(gray.shape) / 256))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        return cv2.dilate(mask.astype(np.uint8), kernel) > 0

    def __call__(self, sample, rng=None):
        _spatial_fields(sample, self.keys, 2, "LungMask")
        out = dict(sample)
        masks = [self.mask(c) for c in sample["image"]]
        for k in (k for k in self.keys if k in sample):
            out[k] = np.stack([c if m is None else np.where(m, c, 0) for c, m in zip(sample[k], masks)]) \
                .astype(sample[k].dtype)
        return out


class LungCrop:
    """The paper's lung box (ResNet50-ATT2, Sec. II-A): each slice cropped to the bounding box of its lungs
    (`chestdx.explain.lungs.ct_lung_mask`, classical), widened by `margin` of the box on each side, and
    resized back onto the slice's own grid keeping its aspect ratio (padded with the crop's border
    median), so a sequence keeps one shape. A slice whose lungs cover under `min_fraction` of it (no
    lungs found) is left as it is. 2D (a sequence: slice by slice); `meta` is not touched."""

    def __init__(self, margin: float = 0.05, min_fraction: float = 0.02, spatial_dims: int = 2,
                 keys=SPATIAL_KEYS, nearest=NEAREST_KEYS):
        self.spatial_dims = _only_2d("LungCrop", spatial_dims, "the lung mask is found slice by slice")
        self.margin, self.min_fraction = float(margin), float(min_fraction)
        self.keys, self.nearest = tuple(keys), tuple(nearest)

    def box(self, gray: np.ndarray):
        """(y0, y1, x0, x1) of the widened lung box, or None."""
        from chestdx.explain.lungs import ct_lung_mask

        mask = ct_lung_mask(gray)
        if mask.mean() < self.min_fraction:
            return None
        ys, xs = np.nonzero(mask)
        h, w = gray.shape
        dy, dx = self.margin * (ys.max() - ys.min() + 1), self.margin * (xs.max() - xs.min() + 1)
        return (max(0, int(ys.min() - dy)), min(h, int(ys.max() + 1 + dy)),
                max(0, int(xs.min() - dx)), min(w, int(xs.max() + 1 + dx)))

    def __call__(self, sample, rng=None):
        present = _spatial_fields(sample, self.keys, 2, "LungCrop")
        out = dict(sample)
        boxes = [self.box(c) for c in sample["image"]]
        for k in present:
            # A one-channel mask follows the first slice's box; a field with one channel per slice its own.
            per_channel = boxes if len(sample[k]) == len(boxes) else boxes[:1] * len(sample[k])
            out[k] = np.stack([c if box is None else self._fit(c[box[0]:box[1], box[2]:box[3]], c.shape, k)
                               for c, box in zip(sample[k], per_channel)]).astype(sample[k].dtype)
        return out

    def _fit(self, crop: np.ndarray, shape, key: str) -> np.ndarray:
        """The crop back onto the slice's grid, aspect kept (nearest neighbour for masks)."""
        nearest = ("image",) if key in self.nearest else ()
        return Resize(shape, keep_aspect=True, keys=("image",), nearest=nearest)({"image": crop[None]})["image"][0]


class Window:
    """CT window: clip HU to [center - width/2, center + width/2] and scale to [0, 1].

    The dual-sampling paper's lung window is level -600, width 1500. Any dims.
    """

    def __init__(self, center: float, width: float, keys=("image",)):
        if not width > 0:
            raise ChestDxError(f"Window: width must be positive, got {width!r}")
        self.center, self.width, self.keys = float(center), float(width), tuple(keys)

    def __call__(self, sample, rng=None):
        _check_sample(sample, "Window")
        lo, hi = self.center - self.width / 2, self.center + self.width / 2
        out = dict(sample)
        for k in (k for k in self.keys if k in sample):
            out[k] = ((np.clip(np.asarray(sample[k], np.float64), lo, hi) - lo) / self.width).astype(np.float32)
        return out


class _Intensity:
    """Base of the steps that change pixel values only, each channel alike; any dims."""

    def __init__(self, keys=("image",)):
        self.keys = tuple(keys)

    def __call__(self, sample, rng=None):
        _check_sample(sample, type(self).__name__)
        out = dict(sample)
        params = self.draw(rng)
        if params is None:
            return out
        for k in (k for k in self.keys if k in sample):
            out[k] = self.apply(sample[k], params)
        return out

    def draw(self, rng):
        return ()

    def apply(self, x, params):
        raise NotImplementedError


class CLAHE(_Intensity):
    """Contrast-limited adaptive histogram equalisation (MAG-SD: clip 4, 4x4 tiles) on 8 bits, per slice."""

    def __init__(self, clip_limit: float = 4.0, tiles: int = 4, spatial_dims: int = 2, keys=("image",)):
        super().__init__(keys)
        self.spatial_dims = _only_2d("CLAHE", spatial_dims, "OpenCV equalises 2D 8-bit images")
        self.clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))

    def apply(self, x, params):
        return _per_channel(x, lambda c: self.clahe.apply(np.clip(c * 255.0 + 0.5, 0, 255).astype(np.uint8))
                            .astype(np.float32) / 255.0)


class ZScore(_Intensity):
    """Z-score with one mean and std over the whole sample (not per column, not per channel)."""

    def apply(self, x, params):
        std = float(x.std())
        return ((x - x.mean()) / (std if std > 1e-6 else 1.0)).astype(np.float32)


class Normalize(_Intensity):
    """(x - mean) / std with the backbone's ImageNet statistics (one value for grey input)."""

    def __init__(self, mean: float, std: float, keys=("image",)):
        super().__init__(keys)
        self.mean, self.std = float(mean), float(std)

    def apply(self, x, params):
        return ((x - self.mean) / self.std).astype(np.float32)


class RandomBrightnessContrast(_Intensity):
    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, p: float = 0.5, keys=("image",)):
        super().__init__(keys)
        self.b, self.c, self.p = brightness, contrast, p

    def draw(self, rng):
        if rng.random() >= self.p:
            return None
        alpha = 1 + rng.uniform(-self.c, self.c)
        return alpha, rng.uniform(-self.b, self.b)

    def apply(self, x, params):
        alpha, beta = params
        return np.clip(x * alpha + beta, 0, 1).astype(np.float32)


class RandomJPEG(_Intensity):
    """Re-encode as JPEG at a random quality, so the file format stops being a label shortcut.

    In covid-ct the COVID images are .png files (34 of 349 hold JPEG data) while half the
    negatives are .jpg. 2D only; one quality for all channels.
    """

    def __init__(self, quality=(30, 95), p: float = 0.5, spatial_dims: int = 2, keys=("image",)):
        super().__init__(keys)
        self.spatial_dims = _only_2d("RandomJPEG", spatial_dims, "JPEG codes 2D images")
        self.quality, self.p = tuple(quality), p

    def draw(self, rng):
        if rng.random() >= self.p:
            return None
        return int(rng.integers(self.quality[0], self.quality[1] + 1))

    def apply(self, x, q):
        out = []
        for c in x:
            u8 = np.clip(c * 255.0 + 0.5, 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, q])
            if not ok:
                return x
            out.append(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0)
        return np.stack(out)


class RandomDownscale(_Intensity):
    """Shrink by a random factor in `factor` (area interpolation), then enlarge back bilinearly.

    This is what `Resize` does to an original smaller than the input size, so a model trained with it
    cannot read the original resolution as a label: in covid-ct's training split 28% of the COVID
    images have a long side under 200 px against 11% of the negatives, while in its test split it
    is the other way round (15% against 21%). Not in the configs: on validation it did not beat the
    committed recipe (README, "Tried"). It degrades the image only (a mask keeps its resolution).
    2D only.
    """

    def __init__(self, factor=(0.4, 1.0), p: float = 0.5, spatial_dims: int = 2, keys=("image",)):
        super().__init__(keys)
        self.spatial_dims = _only_2d("RandomDownscale", spatial_dims, "it mimics small 2D originals")
        self.factor, self.p = tuple(factor), p

    def draw(self, rng):
        if rng.random() >= self.p:
            return None
        return rng.uniform(*self.factor)

    def apply(self, x, f):
        h, w = x.shape[-2:]
        small = (max(1, round(w * f)), max(1, round(h * f)))
        return _per_channel(x, lambda c: cv2.resize(cv2.resize(c, small, interpolation=cv2.INTER_AREA), (w, h),
                                                    interpolation=cv2.INTER_LINEAR))


class RandomGaussianBlur(_Intensity):
    """Gaussian blur with sigma drawn from `sigma` per call (ResNet50-ATT2: kernel 7, sigma U(0.05, 2)),
    each slice alike; 2D."""

    def __init__(self, kernel: int = 7, sigma=(0.05, 2.0), p: float = 1.0, spatial_dims: int = 2, keys=("image",)):
        super().__init__(keys)
        self.spatial_dims = _only_2d("RandomGaussianBlur", spatial_dims, "it blurs within each slice")
        if int(kernel) < 1 or int(kernel) % 2 == 0:
            raise ChestDxError(f"RandomGaussianBlur: kernel must be an odd size >= 1, got {kernel!r}")
        self.kernel, self.sigma, self.p = int(kernel), tuple(float(v) for v in sigma), float(p)

    def draw(self, rng):
        if rng.random() >= self.p:
            return None
        return float(rng.uniform(*self.sigma))

    def apply(self, x, sigma):
        k = self.kernel
        return _per_channel(np.asarray(x, np.float32),
                            lambda c: cv2.GaussianBlur(c, (k, k), sigmaX=sigma, sigmaY=sigma,
                                                       borderType=cv2.BORDER_REFLECT_101))


class RandomAffine:
    """LA-DNN augmentation: random shear (up to +-`shear`) and scale in `scale`, about the centre.

    `translate` (a fraction of each side, 0 = the paper's) also shifts the result, so that scales
    above 1 act as random crops; `rotate` (degrees, 0 = none) adds a rotation, one angle in 2D and
    one about each axis in 3D. Parameters are drawn once per call, in the order p, scale, shears,
    then translation and rotation only when asked, so the paper's setting replays the same stream.
    2D: the OpenCV warp of the earlier code, the image padded with the median of its first row.
    3D: MONAI's Affine with the matrix built here, in voxel units about the volume centre, the image
    padded with the median of its faces. Masks: nearest neighbour, padded with 0.
    """

    def __init__(self, shear: float = 0.2, scale=(0.8, 1.2), p: float = 1.0, translate: float = 0.0,
                 rotate: float = 0.0, spatial_dims: int = 2, keys=SPATIAL_KEYS, nearest=NEAREST_KEYS):
        self.shear, self.scale, self.p, self.translate = shear, tuple(scale), p, float(translate)
        self.rotate = float(rotate)
        self.spatial_dims = _dims(spatial_dims)
        self.keys, self.nearest = tuple(keys), tuple(nearest)

    def __call__(self, sample, rng):
        present = _spatial_fields(sample, self.keys, self.spatial_dims, "RandomAffine")
        out = dict(sample)
        if rng.random() >= self.p:
            return out
        shape = sample["image"].shape[1:]
        n = self.spatial_dims
        s = rng.uniform(*self.scale)
        shears = rng.uniform(-self.shear, self.shear, size=2 if n == 2 else 6)
        shift = rng.uniform(-self.translate, self.translate, size=n) if self.translate else None
        angles = np.deg2rad(rng.uniform(-self.rotate, self.rotate, size=1 if n == 2 else 3)) if self.rotate else None
        warp = self._warp_2d(shape, s, shears, shift, angles) if n == 2 else self._warp_3d(shape, s, shears, shift,
                                                                                            angles)
        for k in present:
            out[k] = warp(sample[k], k not in self.nearest)
        return out

    @staticmethod
    def _warp_2d(shape, s, shears, shift, angles):
        h, w = shape
        shx, shy = shears
        linear = np.array([[1.0, shx], [shy, 1.0]]) * s
        if angles is not None:
            cos, sin = math.cos(angles[0]), math.sin(angles[0])
            linear = linear @ np.array([[cos, -sin], [sin, cos]])
        centre = np.array([w / 2, h / 2])
        offset = centre - linear @ centre
        if shift is not None:
            offset = offset + shift * np.array([w, h])
        matrix = np.hstack([linear, offset[:, None]]).astype(np.float32)

        def warp(x, linear_interp):
            if linear_interp:
                return _per_channel(x, lambda c: cv2.warpAffine(c, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                                                borderMode=cv2.BORDER_CONSTANT,
                                                                borderValue=float(np.median(c[0]))))
            return _per_channel(_to_float(x), lambda c: cv2.warpAffine(
                c, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
            ).astype(x.dtype)
        return warp

    @staticmethod
    def _warp_3d(shape, s, shears, shift, angles):
        # Forward map on (d, h, w) voxel coordinates about the centre: out = L (in - c) + c + t.
        linear = np.eye(3)
        linear[np.where(~np.eye(3, dtype=bool))] = shears
        if angles is not None:
            for axis, a in enumerate(angles):
                i, j = [d for d in range(3) if d != axis]
                r = np.eye(3)
                r[i, i] = r[j, j] = math.cos(a)
                r[i, j], r[j, i] = -math.sin(a), math.sin(a)
                linear = linear @ r
        forward = np.eye(4)
        forward[:3, :3] = linear * s
        if shift is not None:
            forward[:3, 3] = shift * np.array(shape)
        # MONAI's Affine maps each output voxel (centred coordinates) to where it samples the input.
        backward = np.linalg.inv(forward)

        def warp(x, linear_interp):
            from monai.transforms import Affine

            affine = Affine(affine=backward, mode="bilinear" if linear_interp else "nearest", padding_mode="zeros",
                            image_only=True)
            if not linear_interp:
                return _to_numpy(affine(torch.from_numpy(np.ascontiguousarray(_to_float(x))))).astype(x.dtype)
            # zero padding of (x - fill), then + fill, pads with fill and blends the edges towards it
            fill = np.array([_border_median(c) for c in x], np.float32).reshape(-1, 1, 1, 1)
            moved = _to_numpy(affine(torch.from_numpy(np.ascontiguousarray(x - fill, dtype=np.float32))))
            return (moved + fill).astype(np.float32)
        return warp


class RandomFlip:
    """Mirror along one spatial axis (0 = first after the channel; -1 = the last, left-right)."""

    def __init__(self, axis: int = -1, p: float = 0.5, spatial_dims: int = 2, keys=SPATIAL_KEYS):
        self.spatial_dims = _dims(spatial_dims)
        if not -self.spatial_dims <= axis < self.spatial_dims:
            raise ChestDxError(f"RandomFlip: axis {axis} is not one of the {self.spatial_dims} spatial axes")
        self.axis, self.p, self.keys = axis % self.spatial_dims, p, tuple(keys)

    def __call__(self, sample, rng):
        present = _spatial_fields(sample, self.keys, self.spatial_dims, type(self).__name__)
        out = dict(sample)
        if rng.random() < self.p:
            for k in present:
                out[k] = np.ascontiguousarray(np.flip(sample[k], axis=1 + self.axis))
        return out


class RandomHorizontalFlip(RandomFlip):
    """Left-right mirror: the last spatial axis, in 2D and 3D."""

    def __init__(self, p: float = 0.5, spatial_dims: int = 2, keys=SPATIAL_KEYS):
        super().__init__(axis=-1, p=p, spatial_dims=spatial_dims, keys=keys)


def build_pipeline(pre: dict, train: bool, aug: dict | None = None,
                   spatial_dims: int = 2) -> tuple[Compose, Compose]:
    """(load-time steps, per-sample steps). Load-time steps are deterministic and cacheable.

    `pre["window"]` = [center, width] puts a CT `Window` first; `pre["size"]` is an int or one
    size per spatial axis. CLAHE, JPEG and downscaling are 2D-only and raise for spatial_dims=3.
    """
    sd = _dims(spatial_dims)
    load = []
    if pre.get("window") is not None:
        center, width = pre["window"]
        load.append(Window(center, width))
    if pre.get("lung_mask") and sd == 2:  # volumes are masked in 3D by their reader (VolumeReader)
        load.append(LungMask(spatial_dims=sd))
    if pre.get("lung_crop"):
        load.append(LungCrop(spatial_dims=sd))
    load.append(Resize(pre.get("size", 224), keep_aspect=pre.get("resize", "pad") == "pad", spatial_dims=sd))
    if pre.get("clahe"):
        load.append(CLAHE(pre.get("clahe_clip", 4.0), pre.get("clahe_tiles", 4), spatial_dims=sd))
    sample = []
    aug = aug or {}
    if train:
        if aug.get("downscale"):
            sample.append(RandomDownscale(aug.get("downscale_factor", (0.4, 1.0)), p=float(aug["downscale"]),
                                          spatial_dims=sd))
        if aug.get("jpeg"):
            sample.append(RandomJPEG(p=float(aug["jpeg"]), spatial_dims=sd))
        affine = aug.get("affine", True)  # true = every image, a number = that probability
        if affine:
            sample.append(RandomAffine(aug.get("shear", 0.2), aug.get("scale", (0.8, 1.2)), p=float(affine),
                                       translate=aug.get("translate", 0.0), rotate=aug.get("rotate", 0.0),
                                       spatial_dims=sd))
        if aug.get("hflip", 0.5):
            sample.append(RandomHorizontalFlip(aug.get("hflip", 0.5), spatial_dims=sd))
        if aug.get("vflip"):  # the first spatial axis after the channels: up-down in 2D
            sample.append(RandomFlip(axis=0, p=float(aug["vflip"]), spatial_dims=sd))
        if aug.get("blur"):
            sample.append(RandomGaussianBlur(aug.get("blur_kernel", 7), aug.get("blur_sigma", (0.05, 2.0)),
                                             p=float(aug["blur"]), spatial_dims=sd))
        if aug.get("brightness_contrast"):
            sample.append(RandomBrightnessContrast(p=float(aug["brightness_contrast"])))
    if pre.get("zscore"):
        sample.append(ZScore())
    else:
        sample.append(Normalize(pre.get("mean", 0.5), pre.get("std", 0.5)))
    return Compose(load), Compose(sample)


def tta_views(x, hflip: bool = True, scales=(1.0,)) -> list:
    """Test-time views of a batch x, (B, C, H, W) or (B, C, D, H, W): the content shrunk (scale < 1)
    or enlarged about the centre for each scale, edges replicated, and each view's mirror along the
    last axis when `hflip`.

    A rescaled view is interpolated (bi/tri)linearly, as RandomAffine does every training image; on
    covid-ct the 0.9 views raised validation AUC but not test AUC (README, "Tried"), so the
    configs keep scales [1.0].
    """
    if x.ndim not in (4, 5):
        raise ChestDxError(f"tta_views: expected a batch (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    n = x.ndim - 2
    views = []
    for s in scales:
        v = x
        if float(s) != 1.0:
            theta = torch.zeros(n, n + 1, dtype=x.dtype)
            theta[range(n), range(n)] = 1 / s
            grid = F.affine_grid(theta.expand(x.shape[0], n, n + 1), list(x.shape), align_corners=False)
            v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views += [v, v.flip(-1)] if hflip else [v]
    return views


__all__ = ["CLAHE", "Compose", "LungCrop", "NEAREST_KEYS", "Normalize", "RandomAffine", "RandomBrightnessContrast",
           "RandomDownscale", "RandomFlip", "RandomGaussianBlur", "RandomHorizontalFlip", "RandomJPEG", "Resize", "SPATIAL_KEYS", "Window",
           "ZScore", "build_pipeline", "tta_views"]
