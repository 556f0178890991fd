"""A torch Dataset over a manifest: channel-first dict samples for the heads of a model.

A sample is `{"image": (C, *spatial) float32, "targets": {head: ...}, "known": {head: ...},
"index": i}` plus `mask` (1, *spatial) where the manifest has a `mask` column. What `image` is
follows the model's sample kind: a 2D image (1, H, W), a 3D volume (1, D, H, W), or a slice
sequence (S, H, W) with the slices as channels.

Decoding and the deterministic load steps (resize, CLAHE, windowing) run once per file and are
kept by an `ArrayStore` in memory, on disk or not at all (`data.cache`); augmentation runs per
sample with a generator seeded by (seed, epoch, index), so every epoch replays exactly, with any
number of DataLoader workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from chestdx.data.cache import ArrayStore
from chestdx.data.io import read_image
from chestdx.data.manifest import Manifest
from chestdx.data.transforms import Compose


def read_image_channels(path) -> np.ndarray:
    """A 2D image file as (1, H, W) grey pixels in [0, 1]."""
    return read_image(path).to_gray()[None]


class ImageReader:
    """A 2D image file as (1, H, W) grey pixels in [0, 1], CT DICOM through `hu_window` (picklable)."""

    def __init__(self, hu_window=None):
        self.hu_window = None if hu_window is None else (float(hu_window[0]), float(hu_window[1]))

    def __call__(self, path) -> np.ndarray:
        return read_image(path, hu_window=self.hu_window).to_gray()[None]


class VolumeReader:
    """A CT volume as (1, D, H, W) in [0, 1] for a 3D model (picklable), as the dual-sampling paper
    prepares its input (Sec. IV-B): HU put through `hu_window` [center, width] (clipped, scaled to
    [0, 1]; slice-image folders are in [0, 1] already), everything outside the lungs set to 0 when
    `lung_mask` (classical 3D segmentation, `chestdx.data.lungs3d`), then resampled to `spacing` (mm,
    slice axis first) when given. Fitting to the network size by one factor and zero padding is the
    pipeline's `Resize` (keep_aspect). `read_mask` puts a mask through the same geometry."""

    def __init__(self, spacing=None, hu_window=None, lung_mask: bool = False):
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.hu_window = None if hu_window is None else (float(hu_window[0]), float(hu_window[1]))
        self.lung_mask = bool(lung_mask)

    def volume(self, path):
        from chestdx.data.volumes import read_volume
        from chestdx.errors import InputError

        vol = read_volume(path)
        units = vol.meta.get("units")
        if units == "modality":
            raise InputError(path, f"series modality {vol.meta.get('modality') or '?'} is not CT; this model reads CT")
        return vol, units == "HU" or (units == "as-stored" and not _in_unit_range(vol.array))

    def __call__(self, path) -> np.ndarray:
        return self.read(path)[0]

    def read(self, path) -> tuple[np.ndarray, "object"]:
        """(the model's input before the pipeline's steps (1, D', H', W'), the `Volume` as read)."""
        vol, hu = self.volume(path)
        x = vol.array
        if self.lung_mask:
            from chestdx.data.lungs3d import segment_lungs

            lungs = segment_lungs(x, units="HU" if hu else "intensity", spacing=vol.spacing)
        if hu and self.hu_window is not None:
            c, w = self.hu_window
            x = np.clip((x - (c - w / 2)) / w, 0.0, 1.0).astype(np.float32)
        if self.lung_mask:
            x = np.where(lungs > 0, x, np.float32(0.0))
        return self.resampled(x, vol.spacing, linear=True)[None], vol

    def read_mask(self, path) -> np.ndarray:
        from chestdx.data.volumes import read_volume

        vol = read_volume(path)
        return (self.resampled((vol.array > 0.5).astype(np.float32), vol.spacing, linear=True) > 0.5)[None] \
            .astype(np.float32)

    def resampled(self, x: np.ndarray, spacing, linear: bool) -> np.ndarray:
        if self.spacing is None or np.allclose(spacing, self.spacing, rtol=1e-3):
            return x.astype(np.float32, copy=False)
        shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(x.shape, spacing, self.spacing))
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
        return torch.nn.functional.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def model_grid_affine(affine: np.ndarray, shape, spacing, preprocess: dict) -> np.ndarray:
    """The index -> world affine of a volume on the 3D model's grid: after `VolumeReader`'s
    resampling to `preprocess["spacing"]` and the pipeline's `Resize` (one factor, centred padding),
    so a heat map on that grid is written as NIfTI in the patient's own coordinates. Both resizes
    sample cell centres (align_corners=False), so model index q maps to native index
    (q - offset + 0.5) * n / fitted - 0.5 on each axis."""
    n = np.asarray(shape, dtype=float)
    target_spacing = preprocess.get("spacing")
    resampled = n if target_spacing is None else np.maximum(1, np.round(n * np.asarray(spacing) / np.asarray(target_spacing)))
    size = preprocess.get("size", 224)
    target = np.asarray([size] * 3 if np.isscalar(size) else size, dtype=float)
    fitted = target if preprocess.get("resize", "pad") != "pad" else \
        np.maximum(1, np.round(resampled * min(target / resampled)))
    offset = (target - fitted) // 2
    step = n / fitted
    to_native = np.eye(4)
    to_native[:3, :3] = np.diag(step)
    to_native[:3, 3] = (0.5 - offset) * step - 0.5
    return np.asarray(affine, dtype=float) @ to_native


def _in_unit_range(x: np.ndarray) -> bool:
    return float(x.min()) >= 0.0 and float(x.max()) <= 1.0


class SequenceReader:
    """`length` evenly spaced slices of a volume as channels (S, H, W) in [0, 1] (ResNet50-ATT2 draws 16).

    A DICOM CT series arrives in HU and is put through `hu_window` [center, width] (the lung window
    -600 / 1500 by default for the sequence models), as is a NIfTI file whose values leave [0, 1] (CT
    NIfTI stores HU by convention); slice-image folders are already in [0, 1] and pass unchanged; a
    DICOM series of another modality is refused. `size` (H, W) resizes slice folders whose slices differ in size (letterboxed when
    `keep_aspect`, as the training pipeline resizes)."""

    def __init__(self, length: int = 16, size=None, keep_aspect: bool = True, hu_window=None):
        self.length = int(length)
        self.size = None if size is None else tuple(int(s) for s in size)
        self.keep_aspect = bool(keep_aspect)
        self.hu_window = None if hu_window is None else (float(hu_window[0]), float(hu_window[1]))

    def volume(self, path):
        """The drawn sequence as a `Volume` (its meta names the slices drawn), windowed to [0, 1]."""
        from dataclasses import replace

        from chestdx.data.transforms import Window
        from chestdx.data.volumes import draw_sequence, read_volume
        from chestdx.errors import InputError

        seq = draw_sequence(read_volume(path, size=self.size, keep_aspect=self.keep_aspect), self.length)
        units = seq.meta.get("units")
        if units == "modality":  # DICOM that is not CT
            raise InputError(path, f"series modality {seq.meta.get('modality') or '?'} is not CT; "
                                   "the sequence models read CT")
        in_unit_range = float(seq.array.min()) >= 0.0 and float(seq.array.max()) <= 1.0
        # CT NIfTI stores Hounsfield units by convention; a NIfTI already in [0, 1] passes unchanged.
        if units == "HU" or (units == "as-stored" and not in_unit_range):
            if self.hu_window is None:
                raise InputError(path, "a CT series in Hounsfield units needs the model's preprocess.hu_window "
                                       "[center, width] (e.g. the lung window [-600, 1500])")
            windowed = Window(*self.hu_window)({"image": seq.array})["image"]
            seq = replace(seq, array=windowed, meta={**seq.meta, "units": "intensity",
                                                     "hu_window": list(self.hu_window)})
        return seq

    def __call__(self, path) -> np.ndarray:
        return self.volume(path).array


def reader_for(sample_kind: str, preprocess: dict | None = None):
    """The file reader of a sample kind: a sequence reader takes its length, size and HU window from
    `preprocess`, an image reader its HU window (for CT DICOM)."""
    pre = preprocess or {}
    if sample_kind == "sequence":
        size = pre.get("size", 224)
        size = (int(size), int(size)) if np.isscalar(size) else tuple(size)
        return SequenceReader(pre.get("sequence_length", 16), size, pre.get("resize", "pad") == "pad",
                              pre.get("hu_window"))
    if sample_kind == "image":
        return ImageReader(pre.get("hu_window"))
    if sample_kind == "volume":
        return VolumeReader(pre.get("spacing"), pre.get("hu_window"), pre.get("lung_mask", False))
    raise ValueError(f"no reader for sample kind {sample_kind!r}")


class _Loaded:
    """Picklable: read a file, run the keyed load steps on it, return that field's array.

    A mask is loaded with its image (`image_of` maps mask path -> image path), because load steps
    such as LungCrop place the mask by the image's content."""

    def __init__(self, read, load_steps: Compose, key: str, image_of: dict | None = None):
        self.read, self.load_steps, self.key, self.image_of = read, load_steps, key, image_of

    def __call__(self, path) -> np.ndarray:
        if self.key != "mask":
            return self.load_steps({self.key: self.read(path)})[self.key]
        image_path = None if self.image_of is None else self.image_of.get(path)
        if image_path == path:  # an empty mask cell: the item is the image itself, its mask all zeros
            image = self.read(path)
            return self.load_steps({"image": image, "mask": np.zeros_like(image[:1])})["mask"]
        # A reader whose image steps (windowing, lung masking) are not for masks reads them apart.
        pixels = getattr(self.read, "read_mask", self.read)(path)
        mask = (pixels > 0.5).astype(np.float32)
        image = self.read(image_path) if image_path is not None else np.zeros_like(mask)
        return self.load_steps({"image": image, "mask": mask})["mask"]


class ManifestDataset(Dataset):
    def __init__(self, manifest: Manifest, heads, load_steps: Compose, sample_steps: Compose, seed: int = 0,
                 progress: bool = False, cache: str = "memory", cache_dir=None, settings: dict | None = None,
                 read=read_image_channels):
        self.manifest = manifest
        self.heads = list(heads)
        self.sample_steps = sample_steps
        self.seed = seed
        self.epoch = 0
        self.targets = {h.name: manifest.head_targets(h) for h in self.heads}
        self.patients = manifest.patients()
        key = json.dumps({"settings": settings or {}, "load": repr(load_steps)}, sort_keys=True, default=str)
        self.images = ArrayStore(manifest.paths(), _Loaded(read, load_steps, "image"), mode=cache,
                                 cache_dir=cache_dir, settings_key=key, progress=progress)
        self.masks = None
        if "mask" in manifest.frame.columns:
            # An empty cell is "no mask for this case" (e.g. CAP without infection masks): all zeros,
            # flagged by `mask_known` so a loss can leave it out.
            self.mask_known = manifest.frame["mask"].fillna("").astype(str).str.strip().ne("").to_numpy()
            images = manifest.paths()
            items = [m if known else img for m, img, known in
                     zip(self._mask_paths(manifest), images, self.mask_known)]
            image_of = dict(zip(items, images))
            self.masks = ArrayStore(items, _Loaded(read, load_steps, "mask", image_of), mode=cache,
                                    cache_dir=cache_dir, settings_key=key + "mask", progress=progress,
                                    description="Reading masks")

    @staticmethod
    def _mask_paths(manifest: Manifest) -> list:
        column = manifest.frame["mask"].fillna("").astype(str).str.strip()
        return [None if not m else (Path(m) if Path(m).is_absolute() else manifest.root / m) for m in column]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = {"image": self.images[index]}
        if self.masks is not None:
            sample["mask"] = self.masks[index]
        known_mask = None if self.masks is None else bool(self.mask_known[index])
        sample = self.sample_steps(sample, rng)
        out = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in sample.items()}
        out["targets"] = {name: torch.tensor(values[index]) for name, (values, _) in self.targets.items()}
        out["known"] = {name: torch.tensor(known[index]) for name, (_, known) in self.targets.items()}
        if known_mask is not None:
            out["mask_known"] = torch.tensor(known_mask)
        out["index"] = index
        return out

    def head_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, known) of one head over the whole dataset, for metrics."""
        return self.targets[name]
