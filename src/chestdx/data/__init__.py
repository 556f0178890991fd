"""Data layer: image readers, manifests, patient-level splits, transforms and named datasets."""

from chestdx.data.datasets import DATASETS, get_dataset
from chestdx.data.io import LoadedImage, read_image
from chestdx.data.manifest import Manifest
from chestdx.data.splits import check_no_leakage, stratified_group_kfold, train_val_test_split

__all__ = ["DATASETS", "LoadedImage", "Manifest", "check_no_leakage", "get_dataset", "read_image",
           "stratified_group_kfold", "train_val_test_split"]
