"""Synthetic chest CT phantoms: classes drawn as the dual-sampling paper describes, masks that match,
NIfTI files that read back, all four size groups present."""

from __future__ import annotations

import numpy as np
import pandas as pd

from chestdx.data.phantoms import make_phantom, write_phantoms
from chestdx.data.volumes import read_volume


def _sides(mask: np.ndarray) -> int:
    w = mask.shape[2]
    return int(mask[:, :, : w // 2].any()) + int(mask[:, :, w // 2:].any())


def test_classes_differ_as_the_paper_describes():
    covid = [make_phantom("covid", np.random.default_rng(i)) for i in range(12)]
    cap = [make_phantom("cap", np.random.default_rng(100 + i)) for i in range(12)]
    assert np.median([p.ratio for p in covid]) > 3 * np.median([p.ratio for p in cap])  # larger
    assert np.mean([_sides(p.infection) == 2 for p in covid]) > np.mean([_sides(p.infection) == 2 for p in cap])
    dens = lambda ps: np.median([p.hu[p.infection > 0].mean() for p in ps])  # noqa: E731
    assert dens(cap) > dens(covid)  # CAP denser than ground glass
    for p in covid + cap:
        assert (p.infection <= p.lungs).all()  # infection is lung
        assert -900 < p.hu[(p.lungs > 0) & (p.infection == 0)].mean() < -750


def test_same_seed_same_phantom():
    a, b = (make_phantom("covid", np.random.default_rng(7)) for _ in range(2))
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.infection, b.infection)


def test_written_phantoms_read_back_with_manifest(tmp_path):
    path = write_phantoms(tmp_path / "ph", n=24, seed=0)
    frame = pd.read_csv(path)
    assert len(frame) == 24 and set(frame["label"]) == {"covid", "cap"}
    assert frame.groupby("split")["patient_id"].nunique().to_dict() == {"test": 5, "train": 14, "val": 5}
    row = frame.iloc[0]
    vol = read_volume(path.parent / row["path"])
    mask = read_volume(path.parent / row["mask"]).array
    lungs = read_volume(path.parent / row["lung_mask"]).array
    assert vol.spacing == (5.0, 3.5, 3.5)
    assert np.isclose(mask.sum() / lungs.sum(), row["infection_ratio"], rtol=1e-3)
    assert vol.array[mask > 0].mean() > vol.array[(lungs > 0) & (mask == 0)].mean() + 200
    before = path.stat().st_mtime_ns
    assert write_phantoms(tmp_path / "ph", n=24, seed=0) == path and path.stat().st_mtime_ns == before  # reused


def test_all_four_size_groups_present(tmp_path):
    frame = pd.read_csv(write_phantoms(tmp_path / "ph", n=40, seed=0))
    assert set(frame["size_group"]) == {"covid_small", "covid_large", "cap_small", "cap_large"}
