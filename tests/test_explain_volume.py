"""3D explanations on small synthetic volumes whose right answer is known."""

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chestdx.data.volumes import read_volume
from chestdx.errors import ChestDxError
from chestdx.explain.volume import (TITLE_HEIGHT, attention_shares, choose_slices, grad_cam_3d, localization_3d,
                                    montage_png, write_heatmap_nifti)

# ---------------------------------------------------------------- NIfTI


def _affine():
    """An oblique, flipped, anisotropic (d, h, w) -> world affine, so any axis mix-up shows."""
    a = np.zeros((4, 4))
    a[:3, 0] = [0.0, 0.3, -2.5]  # d: mostly along -z
    a[:3, 1] = [0.0, -0.8, 0.0]  # h
    a[:3, 2] = [0.7, 0.0, 0.1]  # w
    a[:3, 3] = [-120.0, 95.5, 40.0]
    a[3, 3] = 1.0
    return a


@pytest.mark.parametrize("name", ["heat.nii.gz", "heat.nii"])
def test_nifti_round_trip_through_read_volume(tmp_path, name):
    heat = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    path = write_heatmap_nifti(heat, _affine(), tmp_path / name)
    vol = read_volume(path)
    assert vol.array.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol.array, heat)
    np.testing.assert_allclose(vol.affine, _affine(), atol=1e-6)
    assert nib.load(str(path)).get_data_dtype() == np.float32
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_nifti_refuses_bad_input(tmp_path):
    with pytest.raises(ChestDxError):
        write_heatmap_nifti(np.zeros((4, 4)), np.eye(4), tmp_path / "h.nii.gz")
    with pytest.raises(ChestDxError):
        write_heatmap_nifti(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "h.png")


# ---------------------------------------------------------------- montages


def _read_rgb(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].astype(int)


def test_montage_grid_and_heat_colour(tmp_path):
    d, h, w = 12, 64, 80
    volume = np.full((d, h, w), 0.5, np.float32)
    heat = np.zeros((d, h, w), np.float32)
    heat[10, 30:50, 40:70] = 1.0
    mask = np.zeros((d, h, w), bool)
    mask[10, 20:28, 10:30] = True
    path = montage_png(volume, heat, tmp_path / "m.png", "case 1", mask=mask, slices=[0, 4, 10, 11, 2])
    img = _read_rgb(path)
    assert img.shape == (TITLE_HEIGHT + 2 * h, 3 * w, 3)  # 5 tiles: 3 wide, 2 rows

    def tile(k):
        r, c = divmod(k, 3)
        return img[TITLE_HEIGHT + r * h:TITLE_HEIGHT + (r + 1) * h, c * w:(c + 1) * w]

    hot, cold = tile(2), tile(0)  # slices 10 and 0
    r, g, b = hot[40, 55]
    assert r > b + 40 and r > g + 40  # heat 1 is red in jet
    r, g, b = cold[40, 55]
    assert b > r + 40  # heat 0 is blue
    assert (hot[20, 10:30] == 255).all() and (hot[20:28, 10] == 255).all()  # the mask's outline
    assert not (cold[20:28, 10:30] == 255).all(-1).any()  # no mask on slice 0
    assert (tile(5) == 0).all()  # the unused cell is black
    assert (hot[:12, :30] > 200).all(-1).any() and not (hot[20:, 40:] > 200).all(-1).any()  # index label only


def test_montage_without_heat_is_grey_and_default_slices(tmp_path):
    volume = np.random.default_rng(1).random((20, 16, 24)).astype(np.float32)
    img = _read_rgb(montage_png(volume, None, tmp_path / "g.png", "grey", n_tiles=6))
    assert img.shape == (TITLE_HEIGHT + 2 * 16, 3 * 24, 3)
    body = img[TITLE_HEIGHT + 12:, :]  # below the labels: grey only
    assert (body[..., 0] == body[..., 1]).all() and (body[..., 1] == body[..., 2]).all()


def test_montage_default_slices_skip_slices_without_lungs(tmp_path):
    volume = np.zeros((20, 16, 24), np.float32)
    volume[2:6] = 0.5  # lungs (a lung-masked input) on slices 2..5 only
    heat = np.full((20, 16, 24), 0.3, np.float32)  # a CAM is positive nearly everywhere
    img = _read_rgb(montage_png(volume, heat, tmp_path / "d.png", "default", n_tiles=16))
    assert img.shape == (TITLE_HEIGHT + 2 * 16, 2 * 24, 3)  # 4 tiles, not 16


def test_coronal_montage_is_upright_and_square_pixels(tmp_path):
    d, h, w = 10, 32, 40
    volume = np.full((d, h, w), 0.5, np.float32)
    heat = np.zeros((d, h, w), np.float32)
    heat[0:2, 16, :] = 1.0  # the lowest slices of coronal slice 16
    path = montage_png(volume, heat, tmp_path / "c.png", "coronal", axis=1, slices=[16], spacing=(3.0, 1.0, 1.0))
    img = _read_rgb(path)
    assert img.shape == (TITLE_HEIGHT + 3 * d, w, 3)  # rows d stretched 3x, one tile
    tile = img[TITLE_HEIGHT:]
    assert tile[-2, 20, 0] > tile[-2, 20, 2] + 40  # d = 0 at the bottom: red
    assert tile[5, 20, 2] > tile[5, 20, 0] + 40  # the top (d = 9): blue


def test_choose_slices_skips_empty_slices():
    heat = np.zeros((20, 4, 4), np.float32)
    heat[3:11, 1, 2] = 0.2
    assert choose_slices(heat, 4) == [3, 5, 8, 10]  # positions round(k * 7 / 3) among slices 3..10
    assert choose_slices(heat, 50) == list(range(3, 11))  # fewer shown slices than asked: all of them
    assert choose_slices(np.zeros((9, 2, 2)), 3) == [0, 4, 8]  # nothing shown: evenly over all
    assert choose_slices(heat.transpose(1, 0, 2), 2, axis=1) == [3, 10]
    assert choose_slices(heat, 4, floor=0.5) == [0, 6, 13, 19]  # nothing above the floor


# ---------------------------------------------------------------- 3D Grad-CAM

SHAPE = (16, 20, 12)
BLOB = (slice(4, 8), slice(12, 16), slice(2, 6))  # stride-2 aligned, off centre, not symmetric


class BlobNet(nn.Module):
    """activation = relu(2x2x2 mean of x) at stride 2; logit = 3 * GAP(activation) - 0.1.

    The Grad-CAM weight of the single channel is positive, so the CAM is the activation itself.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 2, stride=2)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 8)
            self.conv.bias.zero_()
        self.act = nn.ReLU()
        self.fc = nn.Linear(1, 1)
        with torch.no_grad():
            self.fc.weight.fill_(3.0)
            self.fc.bias.fill_(-0.1)

    def forward(self, x):
        a = self.act(self.conv(x))
        return {"logits": self.fc(a.mean(dim=(2, 3, 4))).squeeze(-1), "attention": torch.sigmoid(a)}


def test_grad_cam_3d_finds_the_blob_and_leaves_no_hooks():
    torch.manual_seed(0)
    x = torch.zeros(1, 1, *SHAPE)
    x[(0, 0) + BLOB] = 1.0
    x += 0.01 * torch.rand_like(x)
    model = BlobNet().train()
    heat = grad_cam_3d(model, x, model.act)
    assert heat.shape == SHAPE and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    # the known answer: the activation, upsampled trilinearly, normalised
    with torch.no_grad():
        a = F.relu(F.avg_pool3d(x, 2))
        want = F.interpolate(a, size=SHAPE, mode="trilinear", align_corners=False)[0, 0].numpy()
    want = (want - want.min()) / (want.max() - want.min())
    np.testing.assert_allclose(heat, want, atol=1e-4)
    blob = np.zeros(SHAPE, bool)
    blob[BLOB] = True
    assert blob[np.unravel_index(np.argmax(heat), SHAPE)]
    scores = localization_3d(heat, blob)
    # at 0.5 the thresholded map is the blob less its 8 corner voxels (0.75^3 < 0.5): IoU 56/64
    assert scores["iou"] > 0.8 and scores["pointing"] == 1.0
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               for m in model.modules())
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_3d_refuses_a_non_binary_head():
    class TwoLogits(BlobNet):
        def forward(self, x):
            out = super().forward(x)
            return {"logits": torch.stack([out["logits"], -out["logits"]], 1)}

    model = TwoLogits()
    with pytest.raises(ChestDxError):
        grad_cam_3d(model, torch.rand(1, 1, *SHAPE), model.act)
    assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------- scores


def test_localization_3d_against_hand_computation():
    heat = np.zeros((2, 3, 3), np.float32)
    heat[0, 0, 0] = 1.0  # the maximum
    heat[0, 0, 1] = 0.6
    heat[1, 2, 2] = 0.4  # below the threshold
    mask = np.zeros((2, 3, 3), bool)
    mask[0, 0, 1] = mask[0, 1, 1] = True
    # thresholded {(0,0,0), (0,0,1)}; mask {(0,0,1), (0,1,1)}: 1 shared of 3 voxels
    out = localization_3d(heat, mask)
    assert out["iou"] == pytest.approx(1 / 3)
    assert out["pointing"] == 0.0
    assert out["energy_in"] == pytest.approx(0.6 / 2.0)
    mask[0, 0, 0] = True
    out = localization_3d(heat, mask)
    assert out["iou"] == pytest.approx(2 / 3) and out["pointing"] == 1.0


def test_attention_shares_against_hand_computation():
    heat = np.arange(8, dtype=np.float32).reshape(2, 2, 2)  # sum 28
    lungs = np.zeros((2, 2, 2), bool)
    lungs[:, 0, :] = True  # 0 + 1 + 4 + 5 = 10
    labelled = np.zeros((2, 2, 2), bool)
    labelled[1] = True  # 4 + 5 + 6 + 7 = 22
    shares = attention_shares(heat, {"lungs": lungs, "labelled_slices": labelled})
    assert shares == pytest.approx({"lungs": 10 / 28, "labelled_slices": 22 / 28})
    assert np.isnan(attention_shares(np.zeros((2, 2, 2)), {"lungs": lungs})["lungs"])
    with pytest.raises(ChestDxError):
        attention_shares(heat, {"lungs": lungs[0]})
