"""The full NIH ChestX-ray14 release (Wang et al., CVPR 2017): 112,120 frontal radiographs of
30,805 patients with 14 disease labels mined from the reports, for users who downloaded it.

Put the release's files, as NIH ships them, in `<data root>/chestx-ray14`:

    Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)   one row per image: findings, patient, view
    BBox_List_2017.csv                                   984 boxes on 880 images (optional)
    train_val_list.txt, test_list.txt                    the official patient-level split
    images_001/images/*.png ... images_012/images/*.png  images_001..012.tar.gz, extracted in place

(`images/*.png` and `images_*/*.png` are found too.) The manifest is built from these files;
no manifest.csv is needed and no image is read. The official split has no validation set: a
seeded random 1/8 of the train_val patients (whole patients) becomes `val`. The choice depends on
Data_Entry and the list files only, so an image keeps its split however many tarballs are extracted.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chestdx.data.cxr14_labels import BOX_FINDING_NAMES, CXR14_LABELS, NIH_LABELS, NO_FINDING
from chestdx.data.manifest import Manifest
from chestdx.errors import ChestDxError, DataLeakageError
from chestdx.settings import data_root

__all__ = ["CHESTXRAY14_SOURCE", "ChestXray14Release", "data_entry_csv", "find_images"]

CHESTXRAY14_SOURCE = ("https://nihcc.app.box.com/v/ChestXray-NIHCC (Data_Entry_2017_v2020.csv, BBox_List_2017.csv, "
                      "train_val_list.txt, test_list.txt, images_001..012.tar.gz)")

TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
BBOX_LIST = "BBox_List_2017.csv"

# Data_Entry columns -> manifest columns. The 2017 file splits "OriginalImage[Width,Height]" into the
# headers "OriginalImage[Width" and "Height]"; the v2020 file names them OriginalImageWidth/Height.
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")
_OPTIONAL = {
    "orig_width": ("OriginalImageWidth", "OriginalImage[Width"),
    "orig_height": ("OriginalImageHeight", "Height]"),
    "age": ("Patient Age",),
    "sex": ("Patient Gender",),
    "follow_up": ("Follow-up #",),
}


def data_entry_csv(folder) -> Path | None:
    """The release's Data_Entry_2017*.csv in `folder` (the v2020 one when there are several), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob("Data_Entry_2017*.csv") if p.is_file())
    if not found:
        return None
    v2020 = [p for p in found if "v2020" in p.name]
    return (v2020 or found)[-1]


def find_images(folder) -> dict[str, str]:
    """Image name -> path relative to `folder` (posix) for every PNG under `folder/images*` folders
    (images_001/images/*.png as extracted, images/*.png, images_*/*.png), in one directory scan.
    A name found twice keeps its first path in sorted order."""
    folder = Path(folder)
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    tops = sorted(e.name for e in os.scandir(folder) if e.name.startswith("images") and e.is_dir())
    stack = [(folder / top, top) for top in reversed(tops)]
    while stack:
        path, rel = stack.pop()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if entry.is_dir():
                subdirs.append((Path(entry.path), f"{rel}/{entry.name}"))
            elif entry.name.lower().endswith(".png"):
                found.setdefault(entry.name, f"{rel}/{entry.name}")
        stack.extend(reversed(subdirs))
    return found


def _read_list(path: Path, source: str) -> pd.Index:
    if not path.is_file():
        raise ChestDxError(f"{path} not found: ChestX-ray14 needs the official split files {TRAIN_VAL_LIST} and "
                           f"{TEST_LIST} next to the Data_Entry csv. Download them: {source}")
    names = pd.Series(path.read_text().split(), dtype=object)
    return pd.Index(names.unique())


def _per_value(cells: pd.Series, fn=lambda u: u.str.strip()) -> pd.Series:
    """`fn` (stripping by default) applied to the distinct values of a text column (most have few)."""
    codes, uniques = pd.factorize(cells.astype(object))
    done = fn(pd.Series(uniques, dtype=object)).to_numpy(dtype=object)
    out = np.full(len(cells), None, dtype=object)
    out[codes >= 0] = done[codes[codes >= 0]]
    return pd.Series(out, index=cells.index, dtype=object)


def _number(u: pd.Series) -> pd.Series:  # plain numbers, or ages as "058Y" in early copies
    return pd.to_numeric(u.str.extract(r"(\d+(?:\.\d*)?)", expand=False), errors="coerce")


def _read_data_entry(csv: Path) -> pd.DataFrame:
    try:
        raw = pd.read_csv(csv, dtype=str, skipinitialspace=True, keep_default_na=False)
    except Exception as err:
        raise ChestDxError(f"{csv}: not a readable CSV ({err})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in _REQUIRED if c not in raw.columns]
    if missing:
        raise ChestDxError(f"{csv}: missing column(s) {', '.join(missing)} (is this NIH's Data_Entry_2017 file?)")
    frame = pd.DataFrame({
        "image": _per_value(raw["Image Index"]),
        "findings": _per_value(raw["Finding Labels"],
                               lambda u: u.str.replace(r"\s*\|\s*", "|", regex=True).str.strip()),
        "patient_id": _per_value(raw["Patient ID"]),
        "view": _per_value(raw["View Position"]),
    })
    for name, candidates in _OPTIONAL.items():
        col = next((c for c in candidates if c in raw.columns), None)
        if col is None:
            continue
        if name == "sex":
            frame[name] = _per_value(raw[col]).replace("", np.nan)
        else:
            frame[name] = pd.to_numeric(_per_value(raw[col], _number)).round().astype("Int64")
    for col, what in (("image", "Image Index"), ("findings", "Finding Labels"), ("patient_id", "Patient ID")):
        empty = frame[col].isna() | (frame[col] == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise ChestDxError(f"{csv}: row {row + 2} ({frame['image'].iloc[row] or 'no image name'}) "
                               f"has an empty {what}")
    dup = frame["image"].duplicated()
    if dup.any():
        raise ChestDxError(f"{csv}: image {frame['image'][dup].iloc[0]} is listed more than once")
    return frame


def _label_columns(frame: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """One 0/1 column per CXR14_LABELS name from the `|`-joined findings (vectorised)."""
    # the release has ~800 distinct finding strings: split those, then index back per image
    codes, uniques = pd.factorize(frame["findings"])
    dummies = pd.Series(uniques, dtype=object).str.get_dummies(sep="|")
    dummies = pd.DataFrame(dummies.to_numpy()[codes], columns=dummies.columns, index=frame.index)
    unknown = [c for c in dummies.columns if c not in CXR14_LABELS]
    if unknown:
        col = unknown[0]
        image = frame["image"][dummies[col].to_numpy() == 1].iloc[0]
        raise ChestDxError(f"{csv}: image {image} has the unknown finding {col!r} "
                           f"(known: {', '.join(CXR14_LABELS)})")
    labels = dummies.reindex(columns=list(NIH_LABELS), fill_value=0).astype(int)
    diseased = labels.sum(axis=1) > 0
    if NO_FINDING in dummies.columns:
        both = diseased & (dummies[NO_FINDING] == 1)
        if both.any():
            raise ChestDxError(f"{csv}: image {frame['image'][both].iloc[0]} has '{NO_FINDING}' "
                               "together with a disease")
    labels[NO_FINDING] = (~diseased).astype(int)
    return labels


def _assign_splits(frame: pd.DataFrame, folder: Path, source: str, val_fraction: float, seed: int) -> np.ndarray:
    train_val = _read_list(folder / TRAIN_VAL_LIST, source)
    test = _read_list(folder / TEST_LIST, source)
    in_tv = frame["image"].isin(train_val).to_numpy()
    in_test = frame["image"].isin(test).to_numpy()
    both = in_tv & in_test
    if both.any():
        raise ChestDxError(f"image {frame['image'][both].iloc[0]} is in both {TRAIN_VAL_LIST} and {TEST_LIST}")
    neither = ~(in_tv | in_test)
    if neither.any():
        names = frame["image"][neither]
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise ChestDxError(f"image {names.iloc[0]}{more} of the Data_Entry csv is in neither {TRAIN_VAL_LIST} "
                           f"nor {TEST_LIST} (in {folder})")
    patients = frame["patient_id"].to_numpy(dtype=object)
    leaked = np.intersect1d(patients[in_tv].astype(str), patients[in_test].astype(str))
    if len(leaked):
        more = f" and {len(leaked) - 5} more" if len(leaked) > 5 else ""
        raise DataLeakageError(f"{len(leaked)} patient(s) have images in both {TRAIN_VAL_LIST} and {TEST_LIST}: "
                               f"{', '.join(leaked[:5])}{more}")
    tv_patients = np.unique(patients[in_tv].astype(str))
    n_val = int(round(len(tv_patients) * val_fraction))
    val_patients = np.random.default_rng(seed).permutation(tv_patients)[:n_val]
    split = np.where(in_test, "test", "train").astype(object)
    split[in_tv & np.isin(patients.astype(str), val_patients)] = "val"
    return split


@dataclass(frozen=True)
class ChestXray14Release:
    """NIH ChestX-ray14 as released: the manifest is read from Data_Entry_2017*.csv, the official
    train_val/test lists and the extracted images; `label` is normal (No Finding) / abnormal, and
    the 14 diseases and No Finding are 0/1 columns (AG-CNN's 15 outputs)."""

    name: str = "chestx-ray14"
    description: str = ("the full NIH ChestX-ray14 release: 112,120 frontal radiographs of 30,805 patients, "
                        "14 disease labels + No Finding, the official patient split (val = 1/8 of the train_val "
                        "patients), 984 boxes")
    modality: str = "CXR"
    classes: tuple = ("normal", "abnormal")
    extra_labels: tuple = CXR14_LABELS
    source: str = CHESTXRAY14_SOURCE
    val_fraction: float = 1 / 8
    seed: int = 0

    def folder(self) -> Path:
        return data_root() / self.name

    def present(self) -> bool:
        return data_entry_csv(self.folder()) is not None

    def _not_found(self, folder: Path) -> ChestDxError:
        return ChestDxError(
            f"dataset {self.name!r} not found at {folder} (set CHESTDX_DATA to the folder that holds it; "
            f"{self.name}/ needs Data_Entry_2017*.csv, {TRAIN_VAL_LIST}, {TEST_LIST} and the extracted "
            f"images_*.tar.gz). Download the public original: {self.source}"
        )

    def manifest(self) -> Manifest:
        folder = self.folder()
        csv = data_entry_csv(folder)
        if csv is None:
            raise self._not_found(folder)
        frame = _read_data_entry(csv)
        labels = _label_columns(frame, csv)
        frame["split"] = _assign_splits(frame, folder, self.source, self.val_fraction, self.seed)
        images = find_images(folder)
        paths = frame["image"].map(images)
        have = paths.notna().to_numpy()
        if not have.any():
            raise ChestDxError(f"none of the {len(frame)} images of {csv.name} is in {folder}: extract "
                               f"images_*.tar.gz there (giving images_001/images/*.png ...). "
                               f"Download: {self.source}")
        if not have.all():
            warnings.warn(f"{self.name}: {int((~have).sum())} of the {len(frame)} images of {csv.name} are "
                          f"missing from {folder} and left out (extract all images_*.tar.gz there)",
                          stacklevel=2)
        out = pd.DataFrame({
            "path": paths,
            "label": np.where(labels[NO_FINDING].to_numpy() == 1, "normal", "abnormal"),
            "patient_id": frame["patient_id"],
            "split": frame["split"],
            "view": frame["view"],
            "source": "nih",
        })
        for col in ("orig_width", "orig_height", "age", "sex", "follow_up"):
            if col in frame.columns:
                out[col] = frame[col]
        out["finding"] = frame["findings"]
        out = pd.concat([out, labels], axis=1)[have].reset_index(drop=True)
        return Manifest.from_frame(out, folder, classes=self.classes, extra_labels=CXR14_LABELS,
                                   source=f"{self.name} ({csv})")

    def boxes(self) -> pd.DataFrame | None:
        """The boxes of BBox_List_2017.csv as `path, source, finding, x, y, w, h` (pixels of the
        1024x1024 PNG; findings spelt as in the manifest), for the images present; None without the file."""
        csv = self.folder() / BBOX_LIST
        if not csv.is_file():
            return None
        try:
            raw = pd.read_csv(csv, header=0, usecols=range(6), dtype=str, skipinitialspace=True)
        except Exception as err:
            raise ChestDxError(f"{csv}: not a readable BBox_List_2017 file ({err})") from None
        raw.columns = ["image", "finding", "x", "y", "w", "h"]
        finding = raw["finding"].astype(object).str.strip().replace(BOX_FINDING_NAMES)
        unknown = ~finding.isin(NIH_LABELS)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise ChestDxError(f"{csv}: image {raw['image'].iloc[row]} has a box for the unknown finding "
                               f"{raw['finding'].iloc[row]!r}")
        coords = raw[["x", "y", "w", "h"]].apply(pd.to_numeric, errors="coerce").astype(float)
        if coords.isna().any().any():
            row = int(np.flatnonzero(coords.isna().any(axis=1).to_numpy())[0])
            raise ChestDxError(f"{csv}: row {row + 2} ({raw['image'].iloc[row]}) has a missing or non-numeric "
                               "box coordinate")
        paths = raw["image"].astype(object).str.strip().map(find_images(self.folder()))
        out = pd.concat([pd.DataFrame({"path": paths, "source": "nih", "finding": finding}), coords], axis=1)
        return out[paths.notna().to_numpy()].reset_index(drop=True)
