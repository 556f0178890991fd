"""Classical 3D lung segmentation on real CT (covid-ct-md DICOM, Inf-Net lung crops) and phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from chestdx.data.lungs3d import infection_ratio, lung_volume_ml, segment_lungs
from chestdx.data.phantoms import make_phantom
from chestdx.data.volumes import read_volume


@pytest.mark.parametrize("series", ["images/covid/P001", "images/normal/normal001"])
def test_real_dicom_lungs_have_an_adult_volume_and_lung_density(covid_ct_md_dir, series):
    vol = read_volume(covid_ct_md_dir / series)
    lungs = segment_lungs(vol.array, spacing=vol.spacing) > 0
    assert 1500 < lung_volume_ml(lungs, vol.spacing) < 9000  # adult lungs at inspiration: 3-7 L
    assert -900 < float(vol.array[lungs].mean()) < -650  # aerated parenchyma, not tissue or outside air
    # the air around the body reaches the edge of the field of view; lung never does
    edge = lungs[:, [0, -1], :].sum() + lungs[:, :, [0, -1]].sum()
    assert edge == 0
    # both lungs: voxels on each side of the mid-sagittal plane
    w = lungs.shape[2]
    assert lungs[:, :, : w // 2].sum() > 0.2 * lungs.sum() and lungs[:, :, w // 2:].sum() > 0.2 * lungs.sum()


def test_lung_crop_keeps_lungs_that_reach_the_edges(infnet_volumes_dir):
    # Inf-Net volumes are windowed JPEGs cropped to the lungs; most of the (model-made) infection
    # map must fall inside the segmented lungs, which fill much of the crop.
    vol = read_volume(infnet_volumes_dir / "volumes" / "coronacases_001", mask=infnet_volumes_dir / "masks" /
                      "coronacases_001", size=(256, 256))
    lungs = segment_lungs(vol.array, units="intensity") > 0
    infection = vol.mask > 0  # the reader binarises the soft maps
    assert 0.3 < lungs.mean() < 0.8
    assert (infection & lungs).sum() / infection.sum() > 0.85


@pytest.mark.parametrize("label", ["covid", "cap"])
def test_phantom_lungs_segmented_with_their_infection(label):
    for seed in range(3):
        ph = make_phantom(label, np.random.default_rng(seed))
        found = segment_lungs(ph.hu, spacing=ph.spacing) > 0
        truth = ph.lungs > 0
        dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
        assert dice > 0.95, (label, seed, dice)
        inf = ph.infection > 0
        assert (inf & found).sum() / inf.sum() > 0.9  # the infection is not cut out of the lungs


def test_infection_ratio_counts_voxels():
    lungs = np.zeros((4, 10, 10), np.uint8)
    lungs[:, 2:8, 2:8] = 1  # 144 voxels
    infection = np.zeros_like(lungs)
    infection[1, 3:5, 3:6] = 1  # 6 voxels
    assert infection_ratio(infection, lungs) == pytest.approx(6 / 144)
    assert lung_volume_ml(lungs, (2.0, 1.0, 0.5)) == pytest.approx(144 * 1.0 / 1000)
    with pytest.raises(ValueError, match="empty"):
        infection_ratio(infection, np.zeros_like(lungs))
