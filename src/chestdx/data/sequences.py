"""Slice sequences whose answer is known, composed from real 2D CT slices.

No public set of ordered CT scans with COVID and non-COVID patients fits this workplace, so the
sequence model (`chestdx.models.seqattn`) is checked on sequences built from covid-ct's real
slices: a negative sequence is `length` distinct non-COVID slices; a positive one is the same
with a run of `run` consecutive positions replaced by COVID slices. The label says whether a
COVID slice is present and `lesion_slices` names where, so the sequence attention can be scored
against it. Each split draws only from that split's images, so covid-ct's patient-level split
carries over (no patient is in two splits). These are not anatomical scans: neighbouring slices
come from different patients, which is what the task tests (find the slices that matter), not
what a scanner gives.

Each sequence is a folder of symbolic links `00.png`, `01.jpg`, ... to the source slices (no image
is copied), read by `chestdx.data.volumes.read_slice_folder` in name order.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chestdx.data.manifest import Manifest
from chestdx.errors import ChestDxError
from chestdx.settings import home

SEQUENCES_PER_SPLIT = {"train": 480, "val": 120, "test": 160}


def compose_sequences(manifest: Manifest, out_dir, per_split: dict | None = None, length: int = 16, run: int = 3,
                      positive_class: str = "covid", seed: int = 0) -> Path:
    """Write the sequence folders and `manifest.csv` (path, label, patient_id, split, lesion_slices)
    under `out_dir`, half of each split positive; returns the manifest path. Deterministic in `seed`."""
    out_dir = Path(out_dir)
    per_split = per_split or SEQUENCES_PER_SPLIT
    if not 1 <= run <= length:
        raise ChestDxError(f"compose_sequences: run must be between 1 and length ({length}), got {run}")
    classes = tuple(manifest.classes)
    if positive_class not in classes or len(classes) != 2:
        raise ChestDxError(f"compose_sequences needs a two-class manifest with {positive_class!r}, got {classes}")
    negative_class = next(c for c in classes if c != positive_class)
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in per_split.items():
        sub = manifest.subset(split)
        labels = sub.frame[sub.label_column].astype(str).to_numpy()
        paths = [p.resolve() for p in sub.paths()]
        negatives = [p for p, y in zip(paths, labels) if y == negative_class]
        positives = [p for p, y in zip(paths, labels) if y == positive_class]
        if len(negatives) < length or len(positives) < run:
            raise ChestDxError(f"split {split!r} has {len(negatives)} {negative_class} and {len(positives)} "
                               f"{positive_class} slices: too few for {length}-slice sequences")
        for k in range(int(n)):
            positive = k % 2 == 1
            slices = [negatives[i] for i in rng.choice(len(negatives), size=length, replace=False)]
            lesion = []
            if positive:
                start = int(rng.integers(0, length - run + 1))
                lesion = list(range(start, start + run))
                for pos, i in zip(lesion, rng.choice(len(positives), size=run, replace=False)):
                    slices[pos] = positives[i]
            seq_id = f"{split}-{k:04d}"
            folder = out_dir / split / seq_id
            folder.mkdir(parents=True, exist_ok=True)
            for pos, source in enumerate(slices):
                os.symlink(source, folder / f"{pos:02d}{source.suffix.lower()}")
            rows.append({"path": f"{split}/{seq_id}", "label": positive_class if positive else negative_class,
                         "patient_id": seq_id, "split": split, "lesion_slices": ";".join(map(str, lesion))})
    csv = out_dir / "manifest.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def lesion_slices(manifest: Manifest) -> list[list[int]]:
    """The `lesion_slices` column as lists of slice positions (empty for negatives)."""
    return [[int(v) for v in str(cell).split(";") if v.strip() and v != "nan"]
            for cell in manifest.frame["lesion_slices"].fillna("")]


@dataclass(frozen=True)
class ComposedSequences:
    """covid-ct slices composed into 16-slice sequences (this module), generated on first use under
    CHESTDX_HOME/datasets; a named dataset for configs (`dataset: covid-ct-sequences`)."""

    name: str = "covid-ct-sequences"
    base: str = "covid-ct"
    description: str = ("16-slice sequences of real covid-ct slices, a run of 3 COVID slices in the positives "
                        "(synthetic order, known answer), covid-ct's patient split")
    modality: str = "CT"
    source: str = "generated from covid-ct by chestdx.data.sequences (see covid-ct's source)"
    seed: int = 0
    version: str = "v1"

    def folder(self) -> Path:
        return home() / "datasets" / f"{self.name}-{self.version}-seed{self.seed}"

    def present(self) -> bool:
        from chestdx.data.datasets import get_dataset

        return get_dataset(self.base).present()

    def manifest(self) -> Manifest:
        from chestdx.data.datasets import get_dataset

        csv = self.folder() / "manifest.csv"
        if not csv.is_file():
            base = get_dataset(self.base).manifest()
            tmp = self.folder().with_name(self.folder().name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            compose_sequences(base, tmp, seed=self.seed)
            try:
                tmp.rename(self.folder())  # atomic: a half-written folder is never read
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        return Manifest.from_csv(csv, classes=("noncovid", "covid"))

    def boxes(self):
        return None
