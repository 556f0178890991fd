import math

import pytest
import torch

from chestdx.models import ladnn_loss
from chestdx.models.ladnn import negatives_lesion_free


def bce(logit, y):
    p = 1 / (1 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_loss_matches_hand_computation_with_unknown_lesions_masked():
    out = {"logits": torch.tensor([2.0, -1.0]),
           "lesion_logits": torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0], [9.0, 9.0, 9.0, 9.0, 9.0]])}
    covid = torch.tensor([1, 0])
    lesions = torch.tensor([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)  # image 2: a negative
    losses = ladnn_loss(out, covid, lesions, mask, lesion_weight=1.0)
    l_p = (bce(2.0, 1) + bce(-1.0, 0)) / 2
    l_a = (bce(1.0, 1) + bce(-2.0, 0) + bce(0.5, 0) + bce(0.0, 1)) / 4  # only the four known entries
    assert losses["loss_p"].item() == pytest.approx(l_p, rel=1e-5)
    assert losses["loss_a"].item() == pytest.approx(l_a, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(l_p + l_a, rel=1e-5)


def test_unknown_lesions_do_not_move_the_loss():
    out = {"logits": torch.zeros(1), "lesion_logits": torch.tensor([[50.0, -50.0, 0.0, 0.0, 0.0]])}
    zero_mask = torch.zeros(1, 5)
    a = ladnn_loss(out, torch.tensor([0]), torch.zeros(1, 5), zero_mask)
    assert a["loss_a"].item() == 0.0 and a["loss"].item() == pytest.approx(math.log(2), rel=1e-5)


def test_baseline_ignores_the_lesion_term():
    out = {"logits": torch.tensor([0.3]), "lesion_logits": torch.tensor([[5.0] * 5])}
    losses = ladnn_loss(out, torch.tensor([1]), torch.zeros(1, 5), torch.ones(1, 5), lesion_weight=0.0)
    assert "loss_a" not in losses and losses["loss"].item() == pytest.approx(bce(0.3, 1), rel=1e-5)


def test_negatives_lesion_free_adds_the_negatives_as_known_zeros():
    out = {"logits": torch.tensor([2.0, -1.0]),
           "lesion_logits": torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0], [9.0, -9.0, 0.0, 1.0, -1.0]])}
    covid = torch.tensor([1, 0])
    lesions = torch.tensor([[1, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)  # junk where unknown
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    new_lesions, new_mask = negatives_lesion_free(covid, lesions, mask)
    assert new_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]  # the positive's unknown stays unknown
    assert new_lesions[1].tolist() == [0, 0, 0, 0, 0] and new_lesions[0].tolist() == lesions[0].tolist()
    losses = ladnn_loss(out, covid, new_lesions, new_mask, lesion_weight=1.0)
    positive = bce(1.0, 1) + bce(-2.0, 0) + bce(0.5, 0) + bce(0.0, 1)
    negative = sum(bce(v, 0) for v in (9.0, -9.0, 0.0, 1.0, -1.0))
    assert losses["loss_a"].item() == pytest.approx((positive + negative) / 9, rel=1e-5)
