"""ROC, precision-recall and confusion-matrix figures as PNG (written atomically)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, confusion_matrix, precision_recall_curve, roc_curve  # noqa: E402

from chestdx.utils import atomic_path  # noqa: E402


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_roc(curves: dict, path, title="ROC") -> None:
    """curves: label -> (y_true, prob)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, (y, p) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_pr(curves: dict, path, title="Precision-recall") -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, (y, p) in curves.items():
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label=f"{label} (AP {auc(rec, prec):.3f})")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def plot_confusion(y_true, y_pred, classes, path, title="Confusion matrix") -> None:
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)


def plot_reliability(curves: dict, path, title="Reliability") -> None:
    """curves: label -> (y_true, prob); observed frequency against claimed confidence per bin
    (chestdx.evaluate.calibration.reliability_bins), marker area by the bin's count, ECE in the legend."""
    from chestdx.evaluate.calibration import expected_calibration_error, reliability_bins

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="perfectly calibrated")
    for label, (y, p) in curves.items():
        r = reliability_bins(y, p)
        size = 12 + 120 * r["count"] / max(1, r["count"].max())
        line, = ax.plot(r["confidence"], r["frequency"], "-", lw=1,
                        label=f"{label} (ECE {expected_calibration_error(y, p):.3f})")
        ax.scatter(r["confidence"], r["frequency"], s=size, color=line.get_color(), alpha=0.7)
    binary = all(np.asarray(p).ndim == 1 for _, p in curves.values())
    ax.set(xlabel="predicted probability of the positive class" if binary else "confidence of the top class",
           ylabel="observed frequency" if binary else "accuracy", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
