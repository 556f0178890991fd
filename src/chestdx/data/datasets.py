"""Named datasets: each knows its folder, its manifest columns and where the original lives.

The folder is `<data root>/<name>` with the data root from CHESTDX_DATA (default
../shared/data). Outside this workplace, download the public originals named below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def manifest(self) -> Manifest:
        folder = self.folder()
        csv = folder / "manifest.csv"
        if not csv.is_file():
            raise ChestDxError(
                f"dataset {self.name!r} not found at {folder} (set CHESTDX_DATA to the folder that holds it). "
                f"Download the public original: {self.source}"
            )
        return Manifest.from_csv(csv, classes=self.classes, extra_labels=self.extra_labels)


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
}


@dataclass(frozen=True)
class ManifestFile:
    """A user's own data: `dataset: path/to/manifest.csv` in a config (the manifest contract of
    chestdx.data.manifest; labels are read by the model's heads)."""

    path: str
    description: str = "a manifest file"
    modality: str = ""

    @property
    def name(self) -> str:
        return self.path

    def folder(self) -> Path:
        return Path(self.path).parent

    def manifest(self) -> Manifest:
        return Manifest.from_csv(self.path)


def get_dataset(name: str) -> DatasetInfo | ManifestFile:
    """A named dataset, or a manifest file given by its path (ending in .csv)."""
    if str(name).endswith(".csv"):
        if not Path(name).is_file():
            raise ChestDxError(f"{name}: manifest not found")
        return ManifestFile(str(name))
    if name not in DATASETS:
        raise ChestDxError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
