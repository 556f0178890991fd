"""The training dataset: every cache setting gives the same augmented batches, with workers too."""

import torch
from torch.utils.data import DataLoader

from chestdx.data.datasets import get_dataset
from chestdx.train.config import load_config
from chestdx.train.run import make_dataset


def _batches(cfg, manifest, cache, workers=0):
    cfg = {**cfg, "data": {"cache": cache, "cache_dir": cfg["data"]["cache_dir"]}}
    data = make_dataset(cfg, manifest, train=True)
    data.set_epoch(3)
    loader = DataLoader(data, batch_size=4, shuffle=False, num_workers=workers)
    return [b for b in loader], data


def test_memory_disk_and_none_give_identical_batches(covid_ct_dir, tmp_path):
    cfg = load_config("configs/ladnn_covidct.yaml", ["preprocess.size=64", f"data.cache_dir={tmp_path}"])
    manifest = get_dataset("covid-ct").manifest().subset("train").take(range(8))
    reference, data = _batches(cfg, manifest, "memory")
    assert reference[0]["image"].shape == (4, 1, 64, 64)
    assert set(reference[0]["targets"]) == {"diagnosis", "lesions"} and reference[0]["known"]["lesions"].shape == (4, 5)
    for cache, workers in (("disk", 0), ("disk", 2), ("none", 2)):
        got, _ = _batches(cfg, manifest, cache, workers)
        for a, b in zip(reference, got):
            assert torch.equal(a["image"], b["image"]), (cache, workers)
            assert torch.equal(a["targets"]["lesions"], b["targets"]["lesions"])
    assert len(list(tmp_path.rglob("*.npy"))) == 8  # one disk entry per image
    # Augmentation is per (seed, epoch, index): another epoch draws other views of the same image.
    data.set_epoch(4)
    assert not torch.equal(data[0]["image"], reference[0]["image"][0])
