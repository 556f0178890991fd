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


def read_volume_channels(path) -> np.ndarray:
    """A volume (DICOM series folder, NIfTI, slice folder) as (1, D, H, W)."""
    from chestdx.data.volumes import read_volume

    return read_volume(path).array[None]


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
    return {"volume": read_volume_channels}[sample_kind]


class _Loaded:
    """Picklable: read a file, run the keyed load steps on it, return that field's array."""

    def __init__(self, read, load_steps: Compose, key: str):
        self.read, self.load_steps, self.key = read, load_steps, key

    def __call__(self, path) -> np.ndarray:
        pixels = self.read(path)
        if self.key == "mask":
            pixels = (pixels > 0.5).astype(np.float32)
        return self.load_steps({self.key: pixels})[self.key]


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
            self.masks = ArrayStore(manifest.paths("mask"), _Loaded(read, load_steps, "mask"), mode=cache,
                                    cache_dir=cache_dir, settings_key=key + "mask", progress=progress,
                                    description="Reading masks")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = {"image": self.images[index]}
        if self.masks is not None:
            sample["mask"] = self.masks[index]
        sample = self.sample_steps(sample, rng)
        out = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in sample.items()}
        out["targets"] = {name: torch.tensor(values[index]) for name, (values, _) in self.targets.items()}
        out["known"] = {name: torch.tensor(known[index]) for name, (_, known) in self.targets.items()}
        out["index"] = index
        return out

    def head_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, known) of one head over the whole dataset, for metrics."""
        return self.targets[name]
