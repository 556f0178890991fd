"""The manifest contract: one CSV row per image.

Required columns: `path` (relative to the manifest's folder, or absolute), the label column
(default `label`) and `patient_id`. Optional: `split` (train/val/test) and extra label
columns (e.g. lesions), where an empty cell means "unknown", not "absent".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chestdx.errors import ChestDxError
from chestdx.data.splits import check_no_leakage

SPLITS = ("train", "val", "test")


@dataclass
class Manifest:
    frame: pd.DataFrame
    root: Path
    label_column: str = "label"
    classes: tuple = ()
    extra_labels: tuple = ()

    @classmethod
    def from_csv(cls, csv_path, label_column: str = "label", classes=None, extra_labels=()) -> "Manifest":
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise ChestDxError(f"{csv_path}: manifest not found")
        try:
            frame = pd.read_csv(csv_path, dtype={"patient_id": str, "path": str})
        except Exception as err:
            raise ChestDxError(f"{csv_path}: not a readable CSV ({err})") from None
        return cls.from_frame(frame, csv_path.parent, label_column, classes, extra_labels, source=str(csv_path))

    @classmethod
    def from_frame(cls, frame, root, label_column="label", classes=None, extra_labels=(), source="manifest"):
        missing = [c for c in ("path", label_column, "patient_id") if c not in frame.columns]
        if missing:
            raise ChestDxError(f"{source}: missing column(s) {', '.join(missing)}")
        if frame[["path", label_column, "patient_id"]].isna().any().any():
            bad = frame[frame[["path", label_column, "patient_id"]].isna().any(axis=1)].index[0]
            raise ChestDxError(f"{source}: row {bad + 2} has an empty path, label or patient_id")
        classes = tuple(classes) if classes else tuple(sorted(frame[label_column].astype(str).unique()))
        unknown = sorted(set(frame[label_column].astype(str)) - set(classes))
        if unknown:
            raise ChestDxError(f"{source}: labels {unknown} are not among the classes {list(classes)}")
        for col in extra_labels:
            if col not in frame.columns:
                raise ChestDxError(f"{source}: missing label column {col}")
        if "split" in frame.columns:
            bad = sorted(set(frame["split"].dropna()) - set(SPLITS))
            if bad:
                raise ChestDxError(f"{source}: unknown split values {bad}; use train, val, test")
            check_no_leakage(frame["patient_id"], frame["split"])
        return cls(frame.reset_index(drop=True), Path(root), label_column, classes, tuple(extra_labels))

    def __len__(self) -> int:
        return len(self.frame)

    def subset(self, split: str) -> "Manifest":
        if "split" not in self.frame.columns:
            raise ChestDxError("this manifest has no split column; make one with chestdx.data.splits")
        rows = self.frame[self.frame["split"] == split]
        return Manifest(rows.reset_index(drop=True), self.root, self.label_column, self.classes, self.extra_labels)

    def take(self, indices) -> "Manifest":
        return Manifest(self.frame.iloc[list(indices)].reset_index(drop=True), self.root, self.label_column,
                        self.classes, self.extra_labels)

    def paths(self, column: str = "path") -> list[Path]:
        """The files of a path column (`path`, or e.g. `mask`), relative ones under the manifest's folder."""
        return [p if p.is_absolute() else self.root / p for p in map(Path, self.frame[column])]

    def head_targets(self, head) -> tuple[np.ndarray, np.ndarray]:
        """(values, known) for one model head (chestdx.tasks.Head).

        A binary or multi-class head reads its `column` as class names in the head's label order:
        values (N,) int64, known (N,) float32 (an empty cell is unknown). A multi-label head reads
        one column per label (1/0, empty = unknown): values and known (N, L) float32."""
        if head.task == "multilabel":
            missing = [c for c in head.labels if c not in self.frame.columns]
            if missing:
                raise ChestDxError(f"manifest has no column(s) {', '.join(missing)} for head {head.name!r}")
            values = self.frame[list(head.labels)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
            known = ~np.isnan(values)
            return np.nan_to_num(values, nan=0.0), known.astype(np.float32)
        if head.column not in self.frame.columns:
            raise ChestDxError(f"manifest has no column {head.column!r} for head {head.name!r}")
        cells = self.frame[head.column]
        known = cells.notna().to_numpy()
        lookup = {c: i for i, c in enumerate(head.labels)}
        names = cells[known].astype(str)
        unknown = sorted(set(names) - set(lookup))
        if unknown:
            raise ChestDxError(f"manifest column {head.column!r}: labels {unknown} are not among head "
                               f"{head.name!r}'s labels {list(head.labels)}")
        values = np.zeros(len(cells), np.int64)
        values[known] = names.map(lookup).to_numpy(dtype=np.int64)
        return values, known.astype(np.float32)

    def patients(self) -> np.ndarray:
        return self.frame["patient_id"].astype(str).to_numpy()

    def fingerprint(self) -> str:
        """A hash of what the model saw: paths, labels, patients, splits, file sizes."""
        h = hashlib.sha256()
        cols = [c for c in ("path", self.label_column, "patient_id", "split", *self.extra_labels) if c in self.frame]
        h.update(self.frame[cols].to_csv(index=False).encode())
        for p in self.paths():
            h.update(str(p.stat().st_size if p.exists() else -1).encode())
        return h.hexdigest()[:16]
