"""A torch Dataset over a manifest, with the decoded and resized images cached in memory.

Decoding and resizing are deterministic, so they run once; augmentation runs per sample with
a generator seeded by (seed, epoch, index), which makes every epoch reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from chestdx.data.io import read_image
from chestdx.data.manifest import Manifest
from chestdx.data.transforms import Compose


class ManifestDataset(Dataset):
    def __init__(self, manifest: Manifest, load_steps: Compose, sample_steps: Compose, seed: int = 0,
                 progress: bool = False):
        self.manifest = manifest
        self.sample_steps = sample_steps
        self.seed = seed
        self.epoch = 0
        self.targets = manifest.targets()
        self.extra, self.extra_known = manifest.extra()
        self.patients = manifest.patients()
        self.images = _load_all(manifest.paths(), load_steps, progress)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = self.sample_steps(self.images[index], rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],
            "target": torch.tensor(self.targets[index]),
            "lesions": torch.from_numpy(self.extra[index]),
            "lesion_mask": torch.from_numpy(self.extra_known[index]),
            "index": index,
        }


def _load_all(paths, load_steps: Compose, progress: bool) -> list[np.ndarray]:
    iterator = paths
    if progress:
        from rich.progress import track

        iterator = track(paths, description="Reading images", transient=True)
    return [load_steps(read_image(p).to_gray()) for p in iterator]
