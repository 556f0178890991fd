import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from chestdx.evaluate import binary_metrics, bootstrap_ci, lesion_metrics, youden_threshold


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + 0.65 * rng.random(300), 0, 1)
    return y, p


def test_binary_metrics_agree_with_scikit_learn(scores):
    y, p = scores
    for thr in (0.3, 0.5, 0.7):
        m = binary_metrics(y, p, thr)
        pred = (p >= thr).astype(int)
        assert m["auc"] == pytest.approx(roc_auc_score(y, p))
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
        assert m["precision"] == pytest.approx(precision_score(y, pred))
        assert m["f1"] == pytest.approx(f1_score(y, pred))


def test_youden_threshold_separates_a_separable_problem():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert binary_metrics(y, p, t)["accuracy"] == 1.0


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_data(scores):
    y, p = scores
    groups = np.arange(len(y)) // 2  # two images per patient
    ci = bootstrap_ci(y, p, groups, lambda a, b: {"auc": roc_auc_score(a, b)}, n=300, seed=0)["auc"]
    assert ci[0] < roc_auc_score(y, p) < ci[1]
    small = bootstrap_ci(y[:60], p[:60], groups[:60], lambda a, b: {"auc": roc_auc_score(a, b)}, n=300)["auc"]
    assert (small[1] - small[0]) > (ci[1] - ci[0])


def test_bootstrap_resamples_patients_not_images():
    # One patient holds all the errors; resampling patients makes the CI wide, images would not.
    y = np.array([1] * 50 + [0] * 50)
    p = np.array([0.9] * 50 + [0.1] * 40 + [0.95] * 10)
    one_patient = np.array([f"p{i}" for i in range(90)] + ["bad"] * 10)
    ci = bootstrap_ci(y, p, one_patient, lambda a, b: {"acc": float(((b >= 0.5) == a).mean())}, n=400)["acc"]
    assert ci[1] == pytest.approx(1.0) and ci[0] < 0.95


def test_lesion_metrics_hand_computed():
    y = np.array([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    p = np.array([[0.9, 0.1, 0.6, 0.8, 0.2], [0.9, 0.9, 0.9, 0.9, 0.9], [0.1] * 5])
    known = np.array([[1] * 5, [0] * 5, [1] * 5])  # row 2 unknown (a negative)
    m = lesion_metrics(y, p, known)
    # Row 1: one wrong of five; row 3: all five wrong -> 6 / 10.
    assert m["hamming_loss"] == pytest.approx(0.6) and m["lesion_accuracy"] == pytest.approx(0.4)
    assert m["lesion_n"] == 2


def test_multiclass_metrics_against_hand_computation():
    from chestdx.evaluate.metrics import evaluate_multiclass, multiclass_metrics

    classes = ("covid", "normal", "pneumonia")
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    prob = np.array([[.8, .1, .1], [.6, .3, .1], [.2, .1, .7],   # covid: right, right, called pneumonia
                     [.1, .8, .1], [.5, .4, .1],                 # normal: right, called covid
                     [.1, .1, .8], [.2, .2, .6], [.1, .7, .2]])  # pneumonia: right, right, called normal
    m = multiclass_metrics(y, prob, classes)
    assert m["accuracy"] == pytest.approx(5 / 8)
    # covid: TP 2, FN 1, FP 1, TN 4 -> sens 2/3, spec 4/5, F1 4/6
    assert m["per_class"]["covid"]["sensitivity"] == pytest.approx(2 / 3)
    assert m["per_class"]["covid"]["specificity"] == pytest.approx(4 / 5)
    assert m["per_class"]["covid"]["f1"] == pytest.approx(4 / 6)
    # normal: TP 1, FN 1, FP 1, TN 5
    assert m["per_class"]["normal"]["sensitivity"] == pytest.approx(1 / 2)
    assert m["per_class"]["normal"]["specificity"] == pytest.approx(5 / 6)
    assert m["macro_sensitivity"] == pytest.approx(np.mean([2 / 3, 1 / 2, 2 / 3]))
    assert m["confusion_matrix"] == [[2, 0, 1], [1, 1, 0], [0, 1, 2]]
    # one-vs-rest AUC of covid: scores of covid images vs the rest, by hand (pairs ranked right / all)
    pos, neg = prob[y == 0, 0], prob[y != 0, 0]
    pairs = [(a > b) + 0.5 * (a == b) for a in pos for b in neg]
    assert m["per_class"]["covid"]["auc"] == pytest.approx(np.mean(pairs))
    full = evaluate_multiclass(np.tile(y, 5), np.tile(prob, (5, 1)), np.arange(40), classes, n_boot=200)
    lo, hi = full["macro_f1_ci"]
    assert lo <= full["macro_f1"] <= hi


def test_precision_recall_f1_per_class_and_weighted_by_hand():
    from chestdx.evaluate.metrics import precision_recall_f1

    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = precision_recall_f1(y, pred, ("a", "b", "c"))
    # a: TP 2, FP 0, FN 1 -> P 1, R 2/3; b: TP 1, FP 1, FN 1 -> 1/2, 1/2; c: TP 1, FP 1, FN 0 -> 1/2, 1
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["c"]["precision"] == pytest.approx(0.5) and m["per_class"]["c"]["recall"] == 1.0
    f1 = {"a": 0.8, "b": 0.5, "c": 2 / 3}
    assert m["weighted"]["f1"] == pytest.approx((3 * f1["a"] + 2 * f1["b"] + 1 * f1["c"]) / 6)
    assert m["weighted"]["recall"] == pytest.approx(4 / 6)  # support-weighted recall is accuracy
    assert m["macro"]["f1"] == pytest.approx(np.mean(list(f1.values())))
