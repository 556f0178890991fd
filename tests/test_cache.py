"""ArrayStore: the three cache modes agree, and the disk cache is keyed by content and settings."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from chestdx.data import cache as cache_module
from chestdx.data.cache import CACHE_MODES, ArrayStore, _write_entry
from chestdx.data.io import read_image
from chestdx.errors import ChestDxError


def load64(path) -> np.ndarray:
    """The real decode + deterministic resize, small so the tests stay quick."""
    return cv2.resize(read_image(path).to_gray(), (64, 64), interpolation=cv2.INTER_AREA)


def load32(path) -> np.ndarray:
    return cv2.resize(read_image(path).to_gray(), (32, 32), interpolation=cv2.INTER_AREA)


class CountingLoad:
    """A load that records how often it ran, to tell cache hits from recomputes."""

    def __init__(self, fn=load64):
        self.fn = fn
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return self.fn(path)


class StoreDataset(Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return torch.from_numpy(self.store[i]), i


@pytest.fixture(scope="module")
def images(covid_ct_dir) -> list[Path]:
    """Six real images, from both classes."""
    covid = sorted((covid_ct_dir / "images" / "covid").iterdir())[:3]
    noncovid = sorted((covid_ct_dir / "images" / "noncovid").iterdir())[:3]
    return covid + noncovid


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/*.npy"))


def read_all(store) -> list[np.ndarray]:
    return [store[i] for i in range(len(store))]


def test_modes_return_identical_arrays(images, tmp_path):
    expected = [load64(p) for p in images]
    for mode in CACHE_MODES:
        store = ArrayStore(images, load64, mode=mode, cache_dir=tmp_path / "c", settings_key="64")
        got = read_all(store)
        assert len(store) == len(images)
        for a, b in zip(got, expected):
            assert a.dtype == np.float32 and a.shape == (64, 64)
            assert np.array_equal(a, b)
    assert np.array_equal(store[-1], expected[-1])
    with pytest.raises(IndexError):
        store[len(images)]


def test_disk_writes_one_entry_per_content_and_reuses_it(images, tmp_path):
    cache = tmp_path / "c"
    first_load = CountingLoad()
    first = ArrayStore(images, first_load, mode="disk", cache_dir=cache, settings_key="64")
    assert first_load.calls == 0  # disk mode decodes lazily
    first_arrays = read_all(first)
    read_all(first)  # a second epoch is served from disk
    assert first_load.calls == len(images)

    files = entries(cache)
    assert len(files) == len(images)
    assert all(f.parent.name == f.stem[:2] and len(f.stem) == 64 for f in files)
    assert [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".npy"] == []  # no temp files left

    second_load = CountingLoad()
    second = ArrayStore(images, second_load, mode="disk", cache_dir=cache, settings_key="64")
    for a, b in zip(read_all(second), first_arrays):
        assert np.array_equal(a, b) and a.dtype == np.float32
    assert second_load.calls == 0


def test_memory_decodes_once_up_front_and_none_every_time(images, tmp_path):
    load = CountingLoad()
    store = ArrayStore(images, load, mode="memory", progress=True, description="Reading test images")
    assert load.calls == len(images)
    read_all(store)
    read_all(store)
    assert load.calls == len(images)

    load = CountingLoad()
    store = ArrayStore(images, load, mode="none")
    read_all(store)
    read_all(store)
    assert load.calls == 2 * len(images)
    assert not (Path(os.environ["CHESTDX_HOME"]) / "cache").exists()  # none mode writes nothing


def test_disk_and_none_keep_no_arrays_in_the_object(images, tmp_path):
    for mode in ("disk", "none"):
        store = ArrayStore(images, load64, mode=mode, cache_dir=tmp_path / "c", settings_key="64")
        before = len(pickle.dumps(store))
        read_all(store)
        assert len(pickle.dumps(store)) == before < 4096


def test_settings_keys_do_not_collide(images, tmp_path):
    cache = tmp_path / "c"
    read_all(ArrayStore(images, load64, mode="disk", cache_dir=cache, settings_key='{"size": 64}'))
    load = CountingLoad(load32)
    small = ArrayStore(images, load, mode="disk", cache_dir=cache, settings_key='{"size": 32}')
    got = read_all(small)
    assert load.calls == len(images)
    assert len(entries(cache)) == 2 * len(images)
    assert all(np.array_equal(a, load32(p)) for a, p in zip(got, images))


def test_copy_under_another_name_hits_the_same_entry(images, tmp_path):
    cache = tmp_path / "c"
    original = images[0]
    read_all(ArrayStore([original], load64, mode="disk", cache_dir=cache))
    copy = tmp_path / "renamed.img"
    shutil.copyfile(original, copy)

    load = CountingLoad()
    store = ArrayStore([copy], load, mode="disk", cache_dir=cache)
    assert np.array_equal(store[0], load64(original))
    assert load.calls == 0 and len(entries(cache)) == 1

    # new content under the same path (new size and mtime) must not reuse the old entry
    shutil.copyfile(images[1], copy)
    os.utime(copy, ns=(10**18, 10**18))
    assert np.array_equal(store[0], load64(images[1]))
    assert load.calls == 1 and len(entries(cache)) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_entry_is_recomputed_and_rewritten(images, tmp_path, damage):
    cache = tmp_path / "c"
    read_all(ArrayStore(images[:1], load64, mode="disk", cache_dir=cache))
    (entry,) = entries(cache)
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not numpy" * 50, "empty": b""}[damage])

    load = CountingLoad()
    store = ArrayStore(images[:1], load, mode="disk", cache_dir=cache)
    assert np.array_equal(store[0], load64(images[0]))
    assert load.calls == 1
    assert np.array_equal(np.load(entry), load64(images[0]))  # rewritten, so the next run hits it
    store[0]
    assert load.calls == 1


def _write_many(path: str, seed: int) -> None:
    array = np.full((64, 64), 0.5, dtype=np.float32)
    for _ in range(30):
        _write_entry(Path(path), array)


def test_two_processes_writing_the_same_entry_both_succeed(tmp_path):
    entry = tmp_path / "c" / "ab" / "ab12.npy"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_write_many, args=(str(entry), k)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert np.array_equal(np.load(entry), np.full((64, 64), 0.5, dtype=np.float32))
    assert list(entry.parent.iterdir()) == [entry]  # no temp files left behind


def test_failed_write_leaves_no_partial_entry(images, tmp_path, monkeypatch):
    visible_mid_write = []

    def broken_save(f, array, allow_pickle=False):
        f.write(b"\x93NUMPY half")
        f.flush()
        visible_mid_write.extend(entries(tmp_path / "c"))  # what a concurrent reader would find
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module.np, "save", broken_save)
    store = ArrayStore(images[:1], load64, mode="disk", cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="not written"):
        assert np.array_equal(store[0], load64(images[0]))
    assert visible_mid_write == []
    assert [p for p in (tmp_path / "c").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_dataloader_workers_give_identical_batches(images, tmp_path, mode):
    cache = tmp_path / "c"
    store = ArrayStore(images[:4], load64, mode=mode, cache_dir=cache, settings_key="64")

    def batches(workers):
        loader = DataLoader(StoreDataset(store), batch_size=2, num_workers=workers)
        return [(x.clone(), i.clone()) for x, i in loader]

    parallel = batches(2)
    serial = batches(0)
    assert len(parallel) == len(serial) == 2
    for (xp, ip), (xs, is_) in zip(parallel, serial):
        assert xp.dtype == torch.float32 and xp.shape == (2, 64, 64)
        assert torch.equal(xp, xs) and torch.equal(ip, is_)
    if mode == "disk":  # entries written by the worker processes are reused by this one
        load = CountingLoad()
        read_all(ArrayStore(images[:4], load, mode="disk", cache_dir=cache, settings_key="64"))
        assert load.calls == 0


def test_default_cache_dir_is_under_chestdx_home(images, tmp_path):
    read_all(ArrayStore(images[:1], load64, mode="disk"))
    assert len(entries(Path(os.environ["CHESTDX_HOME"]) / "cache" / "arrays")) == 1


def test_unknown_mode_is_one_clear_line(images):
    with pytest.raises(ChestDxError) as info:
        ArrayStore(images, load64, mode="ram")
    message = str(info.value)
    assert "\n" not in message and "'ram'" in message
    assert all(mode in message for mode in CACHE_MODES)
