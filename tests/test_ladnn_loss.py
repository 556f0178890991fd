"""LA-DNN's loss L = L_P + lambda L_A (Sec. 2.2) as its registered method computes it from the heads."""

import math

import pytest
import torch

from chestdx.models.ladnn import DIAGNOSIS, LESION_HEAD, LADNNMethod, negatives_lesion_free


def bce(logit, y):
    p = 1 / (1 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


class Fixed(torch.nn.Module):
    """A 'model' that returns given outputs, so the loss can be checked by hand."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def losses(out, covid, lesions, mask, heads=(DIAGNOSIS, LESION_HEAD), **train):
    options = train.pop("method", None)
    method = LADNNMethod(list(heads), {"label_smoothing": 0.0, **train}, options)
    batch = {"image": torch.zeros(len(covid)), "targets": {"diagnosis": covid, "lesions": lesions},
             "known": {"diagnosis": torch.ones(len(covid)), "lesions": mask}}
    return method.losses(Fixed(out), batch, None)


def test_loss_matches_hand_computation_with_unknown_lesions_masked():
    out = {"logits": torch.tensor([2.0, -1.0]),
           "lesion_logits": torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0], [9.0, 9.0, 9.0, 9.0, 9.0]])}
    covid = torch.tensor([1, 0])
    lesions = torch.tensor([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)  # image 2: a negative
    got = losses(out, covid, lesions, mask)
    l_p = (bce(2.0, 1) + bce(-1.0, 0)) / 2
    l_a = (bce(1.0, 1) + bce(-2.0, 0) + bce(0.5, 0) + bce(0.0, 1)) / 4  # only the four known entries
    assert got["loss_diagnosis"].item() == pytest.approx(l_p, rel=1e-5)
    assert got["loss_lesions"].item() == pytest.approx(l_a, rel=1e-5)
    assert got["loss"].item() == pytest.approx(l_p + l_a, rel=1e-5)
    weighted = losses(out, covid, lesions, mask, head_weights={"lesions": 2.0})
    assert weighted["loss"].item() == pytest.approx(l_p + 2 * l_a, rel=1e-5)


def test_unknown_lesions_do_not_move_the_loss():
    out = {"logits": torch.zeros(1), "lesion_logits": torch.tensor([[50.0, -50.0, 0.0, 0.0, 0.0]])}
    got = losses(out, torch.tensor([0]), torch.zeros(1, 5), torch.zeros(1, 5))
    assert got["loss_lesions"].item() == 0.0 and got["loss"].item() == pytest.approx(math.log(2), rel=1e-5)


def test_baseline_has_only_the_diagnosis_term():
    out = {"logits": torch.tensor([0.3]), "lesion_logits": torch.tensor([[5.0] * 5])}
    got = losses(out, torch.tensor([1]), torch.zeros(1, 5), torch.ones(1, 5), heads=(DIAGNOSIS,))
    assert "loss_lesions" not in got and got["loss"].item() == pytest.approx(bce(0.3, 1), rel=1e-5)
    zero = losses(out, torch.tensor([1]), torch.zeros(1, 5), torch.ones(1, 5), head_weights={"lesions": 0.0})
    assert "loss_lesions" not in zero and zero["loss"].item() == pytest.approx(bce(0.3, 1), rel=1e-5)


def test_negatives_lesion_free_adds_the_negatives_as_known_zeros():
    out = {"logits": torch.tensor([2.0, -1.0]),
           "lesion_logits": torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0], [9.0, -9.0, 0.0, 1.0, -1.0]])}
    covid = torch.tensor([1, 0])
    lesions = torch.tensor([[1, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)  # junk where unknown
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    new_lesions, new_mask = negatives_lesion_free(covid, lesions, mask)
    assert new_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]  # the positive's unknown stays unknown
    assert new_lesions[1].tolist() == [0, 0, 0, 0, 0] and new_lesions[0].tolist() == lesions[0].tolist()
    got = losses(out, covid, lesions, mask, method={"negatives_lesion_free": True})
    positive = bce(1.0, 1) + bce(-2.0, 0) + bce(0.5, 0) + bce(0.0, 1)
    negative = sum(bce(v, 0) for v in (9.0, -9.0, 0.0, 1.0, -1.0))
    assert got["loss_lesions"].item() == pytest.approx((positive + negative) / 9, rel=1e-5)
