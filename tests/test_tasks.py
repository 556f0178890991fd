"""Task kinds against hand computations and scikit-learn: loss, decision, thresholds, metrics."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from chestdx.evaluate.metrics import evaluate_multilabel, multilabel_metrics
from chestdx.tasks import Head, get_task


def bce(logit, y):
    p = 1 / (1 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_binary_loss_smoothing_decision_and_score():
    task = get_task("binary")
    logits, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 0, 0])
    assert task.loss(logits, y).item() == pytest.approx((bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0)) / 3, rel=1e-6)
    # Label smoothing 0.2 moves the targets to 0.9 and 0.1.
    smoothed = task.loss(logits, y, label_smoothing=0.2).item()
    by_hand = np.mean([0.9 * bce(2.0, 1) + 0.1 * bce(2.0, 0), 0.1 * bce(-1.0, 1) + 0.9 * bce(-1.0, 0),
                       0.1 * bce(0.5, 1) + 0.9 * bce(0.5, 0)])
    assert smoothed == pytest.approx(by_hand, rel=1e-6)
    # An unknown label is left out of the mean.
    known = torch.tensor([1.0, 1.0, 0.0])
    assert task.loss(logits, y, known).item() == pytest.approx((bce(2.0, 1) + bce(-1.0, 0)) / 2, rel=1e-6)
    assert task.decide(np.array([0.2, 0.6, 0.4]), [0.4]).tolist() == [0, 1, 1]
    p = np.array([0.9, 0.2, 0.6, 0.4])
    assert task.score(np.array([1, 0, 1, 0]), p) == roc_auc_score([1, 0, 1, 0], p)
    # Youden's J on validation picks the cut that separates these perfectly.
    assert task.choose_thresholds(np.array([1, 0, 1, 0]), p) == [0.6]


def test_multiclass_loss_is_cross_entropy_and_decision_arg_max():
    task = get_task("multiclass")
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 1])
    by_hand = np.mean([-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))),
                       -math.log(math.e / (1 + math.e + math.exp(3)))])
    assert task.loss(logits, y).item() == pytest.approx(by_hand, rel=1e-6)
    assert task.loss(logits, y, torch.tensor([1.0, 0.0])).item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))), rel=1e-6)
    p = torch.softmax(logits, 1).numpy()
    assert task.decide(p).tolist() == [0, 2]
    rng = np.random.default_rng(0)
    yy, pp = rng.integers(0, 3, 60), rng.dirichlet([1, 1, 1], 60)
    assert task.score(yy, pp) == pytest.approx(roc_auc_score(yy, pp, multi_class="ovr", average="macro"))
    # Ensembling averages the softmax vectors.
    combined = torch.softmax(task.combine([logits, torch.zeros(2, 3)]), 1)
    torch.testing.assert_close(combined, (torch.softmax(logits, 1) + 1 / 3) / 2)


def test_multilabel_loss_masks_unknown_entries_and_thresholds_are_per_label():
    task = get_task("multilabel")
    logits = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    known = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    by_hand = (bce(1.0, 1) + bce(-2.0, 0) + bce(3.0, 0) + bce(-1.0, 0)) / 4
    assert task.loss(logits, y, known).item() == pytest.approx(by_hand, rel=1e-6)
    assert task.decide(np.array([[0.3, 0.3, 0.9]]), [0.2, 0.5, 0.95]).tolist() == [[1, 0, 0]]
    yy = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    pp = np.array([[0.8, 0.1], [0.3, 0.7], [0.6, 0.9], [0.1, 0.2]])
    assert task.choose_thresholds(yy, pp) == [0.6, 0.7]
    # A label with unknown rows: its threshold comes from the known rows only.
    kk = np.array([[1, 1], [1, 1], [1, 1], [1, 0]])
    assert task.choose_thresholds(yy, pp, kk)[1] == 0.7


def test_multilabel_metrics_match_scikit_learn_and_mark_rare_labels_not_estimable():
    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random((n, 3)) < [0.3, 0.2, 0.02]).astype(float)
    y[:3, 2] = 1  # label c: a handful of positives
    p = np.clip(y * 0.4 + rng.random((n, 3)) * 0.6, 0, 1)
    known = np.ones_like(y)
    known[:20, 0] = 0  # label a unknown on 20 rows
    m = multilabel_metrics(y, p, known, ("a", "b", "c"), [0.5, 0.5, 0.5])
    rows = known[:, 0] > 0
    assert m["per_label"]["a"]["auc"] == pytest.approx(roc_auc_score(y[rows, 0], p[rows, 0]))
    assert m["per_label"]["a"]["positives"] == int(y[rows, 0].sum())
    assert m["per_label"]["b"]["f1"] == pytest.approx(f1_score(y[:, 1], p[:, 1] >= 0.5))
    assert m["per_label"]["c"]["estimable"] is False and m["estimable_labels"] == ["a", "b"]
    assert m["macro_auc"] == pytest.approx((m["per_label"]["a"]["auc"] + m["per_label"]["b"]["auc"]) / 2)
    groups = np.arange(n).astype(str)
    ci = evaluate_multilabel(y, p, known, groups, ("a", "b", "c"), [0.5] * 3, n_boot=200)
    lo, hi = ci["macro_auc_ci"]
    assert lo < m["macro_auc"] < hi and hi - lo < 0.2
    assert ci["per_label"]["a"]["auc_ci"][0] < m["per_label"]["a"]["auc"]


def test_heads_validate_their_task_and_round_trip():
    head = Head("findings", "multilabel", ("a", "b"), output="logits")
    assert Head.from_dict(head.to_dict()) == head
    with pytest.raises(ValueError, match="not one of"):
        Head("x", "regression", ("a",))
    with pytest.raises(ValueError, match="negative, positive"):
        Head("x", "binary", ("a", "b", "c"))
