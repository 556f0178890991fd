"""MAG-SD parts against hand computations and synthetic images with a known bright region."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chestdx.explain import explain
from chestdx.models.magsd import MAGSD, attention_pooling, soft_distance_loss
from chestdx.models.magsd_augment import (attention_dimming, attention_mixup, attention_patching, augment, pick_maps,
                                          region_box)
from chestdx.tasks import Head


@pytest.mark.parametrize("scales", [(7,), (7, 14), (7, 14, 28)])
@pytest.mark.parametrize("pooling,width", [("attention", 32 * 320), ("gap", 320), ("gmp", 320)])
def test_attention_generator_and_heads_shapes(scales, pooling, width):
    model = MAGSD(pretrained=None, scales=scales, pooling=pooling).eval()
    out = model(torch.randn(2, 1, 224, 224))
    assert out["logits"].shape == (2, 3) and out["attention"].shape == (2, 32, 7, 7)
    assert len(model.attention.branches) == len(scales)
    assert model.classifier.in_features == width
    assert (out["attention"] >= 0).all()  # ReLU maps


def test_attention_pooling_against_hand_computation():
    a = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 0.0]]]])  # (1, M=2, 2, 2)
    f = torch.tensor([[[[4.0, 1.0], [1.0, 0.0]], [[-1.0, 3.0], [2.0, 1.0]], [[0.0, 0.0], [9.0, 0.0]]]])  # C=3
    # M_j = mean over positions of A_j * f_c: j=0 -> (4+0)/4, (-1+1)/4, (0+0)/4; j=1 -> 2/4, 6/4, 0
    raw = np.array([1.0, 0.0, 0.0, 0.5, 1.5, 0.0])
    signed = np.sign(raw) * np.sqrt(np.abs(raw))
    expected = signed / np.linalg.norm(signed)
    np.testing.assert_allclose(attention_pooling(a, f)[0].numpy(), expected, atol=1e-6)


def _image_with_square():
    img = torch.zeros(1, 1, 64, 64)
    img[0, 0, 16:32, 32:48] = 1.0  # the bright region
    a_star = torch.zeros(1, 8, 8)
    a_star[0, 2:4, 4:6] = 1.0  # attention on the square (8x8 grid -> 64 px)
    return img, a_star


def test_region_box_with_padding():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[5:15, 8:12] = True
    assert region_box(mask) == (5, 15, 8, 12)
    assert region_box(mask, 0.1) == (4, 16, 8, 12)  # 10% of 10 rows = 1 each side; 10% of 4 cols rounds to 0
    assert region_box(torch.zeros(4, 4, dtype=torch.bool)) == (0, 4, 0, 4)


def test_dimming_darkens_exactly_the_attended_pixels():
    img, a_star = _image_with_square()
    out = attention_dimming(img, a_star, theta=torch.tensor([0.3]))
    maps = F.interpolate(a_star[:, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    dimmed = maps > 0.3
    assert torch.allclose(out[0, 0][dimmed], img[0, 0][dimmed] * 0.001)
    assert torch.equal(out[0, 0][~dimmed], img[0, 0][~dimmed])
    assert out[0, 0, 16:32, 32:48].max() <= 0.001 + 1e-6  # the whole square is in the dimmed region


def test_mixup_blends_the_zoomed_box_of_the_square():
    img, a_star = _image_with_square()
    out = attention_mixup(img, a_star, theta=torch.tensor([0.5]))
    box = region_box(F.interpolate(a_star[:, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0] > 0.5,
                     0.1)
    y0, y1, x0, x1 = box
    zoom = F.interpolate(img[:, :, y0:y1, x0:x1], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(out, 0.6 * img + 0.4 * zoom, atol=1e-6)
    # The zoomed box is mostly square: most of the image brightens, far more than the square's 1/16.
    assert (out[0, 0] >= 0.4 - 1e-6).float().mean() > 0.5


def test_patching_pastes_the_square_somewhere_else():
    img, a_star = _image_with_square()
    out = attention_patching(img, a_star, generator=torch.Generator().manual_seed(3), theta=torch.tensor([0.5]))
    maps = F.interpolate(a_star[:, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    y0, y1, x0, x1 = region_box(maps > 0.5)
    patch = img[0, 0, y0:y1, x0:x1]
    ph, pw = patch.shape
    copies = [(ty, tx) for ty in range(64 - ph + 1) for tx in range(64 - pw + 1)
              if torch.equal(out[0, 0, ty:ty + ph, tx:tx + pw], patch) and (ty, tx) != (y0, x0)]
    assert copies  # the attended box now also appears at another position
    ys, xs = torch.nonzero(out[0, 0] != img[0, 0], as_tuple=True)
    assert len(ys) and int(ys.max() - ys.min()) < ph and int(xs.max() - xs.min()) < pw  # only inside one patch


def test_pick_maps_follows_sqrt_of_map_mass_and_normalises():
    att = torch.zeros(1, 3, 4, 4)
    att[0, 0] = 0.0
    att[0, 1, 0, 0] = 1.0  # mass 1
    att[0, 2] = 0.25  # mass 4 -> sqrt 2: twice as likely as map 1
    gen = torch.Generator().manual_seed(0)
    picks = pick_maps(att.expand(4000, -1, -1, -1).contiguous(), 1, gen)[:, 0]
    is_map2 = (picks[:, 1, 1] == 1.0).float().mean()
    assert float(is_map2) == pytest.approx(2 / 3, abs=0.03)  # sqrt(4) / (sqrt(1) + sqrt(4)); map 0 never
    assert torch.allclose(picks.flatten(1).amax(1), torch.ones(4000))


def test_augment_runs_only_the_enabled_ones():
    img = torch.rand(2, 1, 32, 32)
    att = torch.rand(2, 32, 4, 4)
    assert set(augment(img, att, ("mixup",))) == {"mixup"}
    assert set(augment(img, att, ("dimming", "patching", "mixup"))) == {"mixup", "dimming", "patching"}
    assert augment(img, att, ()) == {}


def test_soft_distance_matches_algorithm_1_by_hand():
    raw = torch.tensor([[4.0, 0.0, 0.0],   # right and confident (p0 = 0.964): P' = softmax(raw)
                        [0.5, 0.0, 0.0],   # right but unsure (p0 = 0.45 < 0.7): P' = smoothed label
                        [0.0, 5.0, 0.0]])  # confident but wrong: P' = smoothed label
    target = torch.tensor([0, 0, 0])
    aug = [torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]),
           torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])]
    out = soft_distance_loss(raw, aug, target)
    p_raw = torch.softmax(raw, 1)
    smooth = torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    refs = [p_raw[0], smooth, smooth]
    expected_reg = 0.0
    for logits in aug:
        p = torch.softmax(logits, 1)
        expected_reg += sum(float((refs[i] - p[i]).abs().sum()) for i in range(3)) / 3
    ce = float(F.cross_entropy(raw, target))
    assert float(out["loss_ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(out["loss_reg"]) == pytest.approx(expected_reg, rel=1e-6)
    assert float(out["loss"]) == pytest.approx(ce + expected_reg, rel=1e-6)
    assert float(out["trusted"]) == pytest.approx(1 / 3)
    # The reference is detached: no gradient flows into the raw logits through the distance.
    raw_g = raw.clone().requires_grad_(True)
    aug_g = [a.clone().requires_grad_(True) for a in aug]
    soft_distance_loss(raw_g, aug_g, target)["loss_reg"].backward()
    assert raw_g.grad is None and aug_g[0].grad is not None
    l2 = soft_distance_loss(raw, aug, target, mode="l2")
    onehot = torch.tensor([1.0, 0.0, 0.0])
    expected_l2 = sum(float(((onehot - torch.softmax(a, 1)) ** 2).sum(1).mean()) for a in aug)
    assert float(l2["loss_reg"]) == pytest.approx(expected_l2, rel=1e-6)


def test_native_attention_maps_reach_the_explainer():
    model = MAGSD(pretrained=None).eval()
    heads = [Head("diagnosis", "multiclass", ("covid", "normal", "pneumonia"))]
    result = explain(model, torch.randn(2, 1, 64, 64), "native", "predicted", heads)
    assert result.maps.shape == (2, 1, 64, 64)
    assert result.probabilities.shape == (2, 3) and np.allclose(result.probabilities.sum(1), 1, atol=1e-5)
    gradcam = explain(model, torch.randn(1, 1, 64, 64), "gradcam", "covid", heads)
    assert gradcam.maps.shape == (1, 1, 64, 64)
