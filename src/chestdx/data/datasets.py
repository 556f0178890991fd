"""Named datasets: each knows its folder, its manifest columns and where the original lives.

The folder is `<data root>/<name>` with the data root from CHESTDX_DATA (default
../shared/data). Outside this workplace, download the public originals named below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from chestdx.data.cxr14_labels import CXR14_LABELS, NIH_LABELS, NO_FINDING
from chestdx.data.manifest import Manifest
from chestdx.errors import ChestDxError
from chestdx.settings import data_root


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    modality: str
    classes: tuple
    extra_labels: tuple
    source: str

    def folder(self) -> Path:
        return data_root() / self.name

    def present(self) -> bool:
        return (self.folder() / "manifest.csv").is_file()

    def manifest(self) -> Manifest:
        folder = self.folder()
        csv = folder / "manifest.csv"
        if not csv.is_file():
            raise ChestDxError(
                f"dataset {self.name!r} not found at {folder} (set CHESTDX_DATA to the folder that holds it). "
                f"Download the public original: {self.source}"
            )
        return Manifest.from_csv(csv, classes=self.classes, extra_labels=self.extra_labels)

    def boxes(self) -> pd.DataFrame | None:
        """Annotated boxes (`path, finding, x, y, w, h` in pixels of the stored image), if the dataset has them."""
        csv = self.folder() / "boxes.csv"
        return pd.read_csv(csv) if csv.is_file() else None


@dataclass(frozen=True)
class NIHSample(DatasetInfo):
    """The NIH ChestX-ray14 rows of cxr-covid with their 14 labels and `No Finding` (1 where none of
    the 14 is present): AG-CNN's 15 outputs on a small real sample, with cxr-covid's patient split."""

    base: str = "cxr-covid"

    def folder(self) -> Path:
        return data_root() / self.base

    def manifest(self) -> Manifest:
        m = DATASETS[self.base].manifest()
        frame = m.frame[m.frame["source"] == "nih"].copy()
        labels = frame[list(NIH_LABELS)].apply(pd.to_numeric, errors="coerce")
        if labels.isna().any().any():
            raise ChestDxError(f"{self.folder() / 'manifest.csv'}: NIH rows with an empty ChestX-ray14 label")
        frame[NO_FINDING] = (labels.sum(axis=1) == 0).astype(int)
        return Manifest.from_frame(frame, m.root, classes=m.classes, extra_labels=CXR14_LABELS,
                                   source=f"{self.name} (from {self.base})")

    def boxes(self) -> pd.DataFrame | None:
        boxes = super().boxes()
        return None if boxes is None else boxes[boxes["path"].str.startswith("images/nih/")].reset_index(drop=True)


DATASETS = {
    "covid-ct": DatasetInfo(
        name="covid-ct",
        description="746 2D chest CT images (349 COVID / 397 not) with five lesion labels and the LA-DNN split",
        modality="CT",
        classes=("noncovid", "covid"),
        extra_labels=("GGO", "Csld", "CrPa", "AirBr", "InSepThi"),
        source="images: github.com/UCSD-AI4H/COVID-CT (Images-processed); split and lesion labels: "
               "github.com/xiaoxuegao499/LA-DNN-for-COVID-19-diagnosis (data_split/*_meta.csv)",
    ),
    "cxr-covid": DatasetInfo(
        name="cxr-covid",
        description="1661 frontal chest radiographs, covid / pneumonia / normal, with lung masks and boxes",
        modality="CXR",
        classes=("normal", "pneumonia", "covid"),
        extra_labels=(),
        source="github.com/ieee8023/covid-chestxray-dataset, the Hannover COVID CXR set and NIH ChestX-ray14; "
               "see the README in the dataset folder",
    ),
    "cxr14-sample": NIHSample(
        name="cxr14-sample",
        description="the 999 NIH ChestX-ray14 images of cxr-covid: 14 disease labels + No Finding, patient split, "
                    "254 boxes on 160 images",
        modality="CXR",
        classes=("normal", "pneumonia", "covid"),
        extra_labels=CXR14_LABELS,
        source="the NIH rows of cxr-covid (NIH ChestX-ray14, nihcc.app.box.com/v/ChestXray-NIHCC)",
    ),
}


def register_dataset(info) -> None:
    """Add a named dataset (any object with name, description, modality, source, folder(), present(),
    manifest() and boxes())."""
    if info.name in DATASETS:
        raise ValueError(f"dataset {info.name!r} registered twice")
    DATASETS[info.name] = info


@dataclass(frozen=True)
class CTPhantoms:
    """Synthetic chest CT phantoms with infection and lung masks (chestdx.data.phantoms), generated on
    first use under CHESTDX_HOME/datasets; the dual-sampling configs' default (`dataset: ct-phantoms`)."""

    name: str = "ct-phantoms"
    description: str = ("synthetic chest CT volumes, COVID (larger, peripheral, bilateral ground glass) vs CAP "
                        "(smaller, unilateral, denser), with infection and lung masks: the answer is known")
    modality: str = "CT"
    source: str = "generated by chestdx.data.phantoms"
    n: int = 300
    seed: int = 0

    def folder(self) -> Path:
        from chestdx.settings import home

        return home() / "datasets" / f"{self.name}-n{self.n}-seed{self.seed}"

    def present(self) -> bool:
        return True  # made on demand

    def manifest(self) -> Manifest:
        from chestdx.data.phantoms import write_phantoms

        return Manifest.from_csv(write_phantoms(self.folder(), n=self.n, seed=self.seed))

    def boxes(self):
        return None


def _register_releases() -> None:
    from chestdx.data.chestxray14 import ChestXray14Release
    from chestdx.data.sequences import ComposedSequences

    register_dataset(ChestXray14Release())
    register_dataset(ComposedSequences())
    register_dataset(CTPhantoms())


_register_releases()


@dataclass(frozen=True)
class ManifestFile:
    """A user's own data: `dataset: path/to/manifest.csv` in a config (the manifest contract of
    chestdx.data.manifest; labels are read by the model's heads)."""

    path: str
    description: str = "a manifest file"
    modality: str = ""
    source: str = "your own manifest"

    @property
    def name(self) -> str:
        return self.path

    def folder(self) -> Path:
        return Path(self.path).parent

    def present(self) -> bool:
        return Path(self.path).is_file()

    def manifest(self) -> Manifest:
        return Manifest.from_csv(self.path)

    def boxes(self) -> pd.DataFrame | None:
        return None


def get_dataset(name: str) -> DatasetInfo | ManifestFile:
    """A named dataset, or a manifest file given by its path (ending in .csv)."""
    if str(name).endswith(".csv"):
        if not Path(name).is_file():
            raise ChestDxError(f"{name}: manifest not found")
        return ManifestFile(str(name))
    if name not in DATASETS:
        raise ChestDxError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
