"""Explanations on synthetic images whose right answer is known: a bright square."""

import numpy as np
import pytest
import torch
from torch import nn

from chestdx.errors import ChestDxError
from chestdx.explain import (CAM_METHODS, bounding_box, box_iou, ct_lung_mask, deletion_insertion, energy_share,
                             explain, largest_component, localize, map_ssim, mask_iou, otsu_threshold, pointing_hit,
                             randomized_copy, sqrt_product, threshold_mask)
from chestdx.explain.localization import summarise, xywh_box
from chestdx.models import LADNN, get_entry
from chestdx.tasks import Head

SQUARE = (slice(20, 36), slice(36, 52))  # rows 20..35, columns 36..51 of a 64 x 64 image


class SquareModel(nn.Module):
    """Sees only pixels brighter than 0.5: activation = relu(x - 0.5); logit = GAP(activation)."""

    heads = [Head("diagnosis", "binary", ("class0", "class1"))]

    def __init__(self, dims: int = 2, stride: int = 1):
        super().__init__()
        conv, pool = (nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.MaxPool3d)
        self.conv = conv(1, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[(slice(None), 0) + (1,) * dims] = torch.tensor([1.0, 2.0, 0.5, 1.5])
            self.conv.bias.fill_(-0.5)
        self.features = nn.Sequential(self.conv, nn.ReLU(), pool(stride) if stride > 1 else nn.Identity())
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.fill_(-0.05)

    def forward(self, x):
        a = self.features(x)
        return {"logits": self.head(a.flatten(2).mean(-1)).squeeze(-1)}

    def target_layer(self):
        return self.features

    def native_maps(self, x):
        return self.features(x)


def square_image(batch: int = 2) -> torch.Tensor:
    x = torch.zeros(batch, 1, 64, 64)
    x[(slice(None), 0) + SQUARE] = 1.0
    return x


@pytest.mark.parametrize("method", ["native", *CAM_METHODS])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_method_peaks_on_the_square(method, stride):
    result = explain(SquareModel(stride=stride), square_image(), method, target="class1")
    assert result.maps.shape == (2, 1, 64, 64)  # input resolution even when the layer is coarser
    for m in result.maps[:, 0]:
        peak = np.unravel_index(np.argmax(m), m.shape)
        assert SQUARE[0].start <= peak[0] < SQUARE[0].stop and SQUARE[1].start <= peak[1] < SQUARE[1].stop
        assert energy_share(m, _square_mask()) > 0.9


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "native"])
def test_box_of_the_largest_component_is_the_square(method):
    m = explain(SquareModel(), square_image(1), method, target="class1").maps[0, 0]
    box = bounding_box(largest_component(threshold_mask(m, 0.5)))
    assert box == [(20, 36), (36, 52)]
    assert bounding_box(largest_component(threshold_mask(m, "otsu"))) == box


def test_3d_input_gives_a_3d_map():
    x = torch.zeros(1, 1, 8, 16, 16)
    x[0, 0, 2:5, 4:9, 10:14] = 1.0
    for method in ("gradcam", "gradcam++", "native"):
        m = explain(SquareModel(dims=3, stride=2), x, method, target="class1").maps
        assert m.shape == (1, 1, 8, 16, 16)
        peak = np.unravel_index(np.argmax(m[0, 0]), (8, 16, 16))
        assert 2 <= peak[0] < 5 and 4 <= peak[1] < 9 and 10 <= peak[2] < 14
    with pytest.raises(ChestDxError, match="2D images only"):
        explain(SquareModel(dims=3), x, "scorecam", target="class1")


def test_ladnn_targets_each_lesion_head_and_refuses_unknown_names():
    torch.manual_seed(0)
    model = LADNN(pretrained=None).eval()
    x = torch.randn(3, 1, 64, 64)
    names = dict(heads=get_entry("ladnn").heads)
    result = explain(model, x, "gradcam++", ["covid", "lesions"], **names)
    assert result.target_names == ["covid", "GGO", "Csld", "CrPa", "AirBr", "InSepThi"]
    assert result.maps.shape == (3, 6, 64, 64)
    assert result.columns[0].tolist() == [1, 2, 3, 4, 5, 6]
    # Probabilities: the two class columns sum to one; lesion columns are independent sigmoids.
    with torch.no_grad():
        out = model(x)
    np.testing.assert_allclose(result.probabilities[:, 1], torch.sigmoid(out["logits"]).numpy(), atol=1e-6)
    np.testing.assert_allclose(result.probabilities[:, 2:], torch.sigmoid(out["lesion_logits"]).numpy(), atol=1e-6)
    # Different heads look at different evidence.
    assert not np.allclose(result.maps[:, 1], result.maps[:, 2])
    with pytest.raises(ChestDxError, match="unknown target 'Effusion'.*GGO"):
        explain(model, x, "gradcam", "Effusion", **names)
    with pytest.raises(ChestDxError, match="no native attention"):
        explain(model, x, "native", "covid", **names)
    with pytest.raises(ChestDxError, match="unknown explanation method"):
        explain(model, x, "saliency", "covid", **names)


def test_predicted_target_follows_each_image():
    model = SquareModel()
    x = torch.cat([square_image(1), torch.zeros(1, 1, 64, 64)])  # logit +0.11 vs -0.05
    result = explain(model, x, "gradcam", "predicted")
    assert result.columns[:, 0].tolist() == [1, 0]


def _square_mask():
    mask = np.zeros((64, 64), bool)
    mask[SQUARE] = True
    return mask


def test_localization_scores_against_hand_computation():
    heat = np.zeros((10, 10), np.float32)
    heat[2:6, 2:6] = 1.0  # 16 pixels at 1
    heat[8, 8] = 0.25  # a weak spot outside
    ref = np.zeros((10, 10), bool)
    ref[4:8, 4:8] = True  # overlaps the hot square on 2 x 2 = 4 pixels
    assert mask_iou(threshold_mask(heat, 0.5), ref) == pytest.approx(4 / (16 + 16 - 4))
    assert energy_share(heat, ref) == pytest.approx(4 / 16.25)
    assert pointing_hit(heat, ref)  # the maximum plateau touches the reference
    far = np.zeros((10, 10), bool)
    far[0, 9] = True
    assert not pointing_hit(heat, far)
    assert box_iou([(2, 6), (2, 6)], [(4, 8), (4, 8)]) == pytest.approx(4 / 28)
    assert box_iou([(0, 2), (0, 2)], [(5, 6), (5, 6)]) == 0.0
    assert box_iou([(0, 2), (0, 2), (0, 2)], [(0, 2), (0, 2), (1, 3)]) == pytest.approx(4 / 12)
    scores = localize(heat, boxes=[[(4, 8), (4, 8)], [(2, 6), (2, 6)]], threshold=0.5)
    assert scores["box_iou"] == pytest.approx(1.0)  # best-matching box
    assert xywh_box(10, 20, 30, 40, 0.5, 0.5) == [(10, 30), (5, 20)]


def test_postprocessing():
    m = np.zeros((20, 20), np.float32)
    m[2:5, 2:5] = 0.9  # 9 pixels
    m[10:16, 10:16] = 0.8  # 36 pixels: the largest component
    assert bounding_box(largest_component(threshold_mask(m, 0.5))) == [(10, 16), (10, 16)]
    assert 0 < otsu_threshold(m) <= 0.8 / 0.9
    assert bounding_box(np.zeros((4, 4), bool)) is None
    cube = np.zeros((6, 6, 6), bool)
    cube[1:3, 1:3, 1:3] = True
    cube[4:6, 0:6, 0:6] = True
    assert bounding_box(largest_component(cube)) == [(4, 6), (0, 6), (0, 6)]
    a, b = np.array([0.0, 1.0, 1.0, 0.5]), np.array([0.0, 1.0, 0.25, 1.0])
    np.testing.assert_allclose(sqrt_product(a, b), [0, 1, 0.5, np.sqrt(0.5)])


def test_localization_summary_per_class_with_ci():
    rows = [{"iou": v} for v in (0.2, 0.4, 0.6, 0.8)]
    out = summarise(rows, patients=["a", "a", "b", "c"], groups=["x", "x", "y", "y"], n_boot=200)
    assert out["all"]["iou"]["mean"] == pytest.approx(0.5)
    assert out["x"]["iou"]["mean"] == pytest.approx(0.3) and out["y"]["iou"]["n"] == 2
    lo, hi = out["all"]["iou"]["ci"]
    assert 0.2 - 1e-9 <= lo <= 0.5 <= hi <= 0.8 + 1e-9


def test_randomization_changes_the_model_and_ssim_tells():
    model = SquareModel()
    rand = randomized_copy(model, seed=1)
    assert not torch.equal(model.conv.weight, rand.conv.weight)
    assert torch.equal(model.conv.weight, SquareModel().conv.weight)  # the original is untouched
    maps = explain(model, square_image(), "gradcam").maps[:, 0]
    assert map_ssim(maps, maps) == pytest.approx([1.0, 1.0], abs=1e-4)
    noise = np.random.default_rng(0).random(maps.shape).astype(np.float32)
    assert (map_ssim(maps, noise) < 0.3).all()


def test_deletion_drops_faster_than_insertion_for_the_right_map():
    model = SquareModel()
    x = square_image(1)
    right = explain(model, x, "gradcam", "class1").maps[:, 0]
    wrong = 1.0 - right  # attends everywhere but the square
    good = deletion_insertion(model, x, right, [1], model.heads)
    bad = deletion_insertion(model, x, wrong, [1], model.heads)
    assert good["deletion_auc"][0] < good["insertion_auc"][0]
    assert good["deletion_auc"][0] < bad["deletion_auc"][0]
    assert good["insertion_auc"][0] > bad["insertion_auc"][0]


def test_ct_lung_mask_on_a_phantom():
    yy, xx = np.mgrid[:256, :256]
    body = ((yy - 128) / 100) ** 2 + ((xx - 128) / 120) ** 2 < 1
    left = ((yy - 128) / 60) ** 2 + ((xx - 75) / 35) ** 2 < 1
    right = ((yy - 128) / 60) ** 2 + ((xx - 181) / 35) ** 2 < 1
    img = np.where(body, 0.7, 0.02).astype(np.float32)
    img[left | right] = 0.15
    img[128, 75] = 0.8  # a vessel inside the lung is filled in
    mask = ct_lung_mask(img)
    assert mask_iou(mask, left | right) > 0.95
    assert not mask[5, 5]  # air around the body is not lung


def test_reference_boxes_follow_the_image_onto_the_model_grid():
    from types import SimpleNamespace

    from chestdx.data.transforms import build_pipeline
    from chestdx.explain.postprocess import box_to_mask
    from chestdx.explain.run import _reference_on_grid

    load, _ = build_pipeline({"size": 64, "resize": "pad"}, train=False)
    predictor = SimpleNamespace(load_steps=load)
    full = box_to_mask((100, 200), xywh_box(50, 20, 50, 40))  # x 50..100, y 20..60 on a 200 x 100 image
    box = bounding_box(_reference_on_grid(predictor, full))
    # Scale 64/200 = 0.32, 32 rows of image padded by 16 above: y 16+6.4..16+19.2, x 16..32.
    (y0, y1), (x0, x1) = box
    assert abs(y0 - 22.4) <= 1 and abs(y1 - 35.2) <= 1 and abs(x0 - 16) <= 1 and abs(x1 - 32) <= 1
