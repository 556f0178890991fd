"""The LA-DNN paper's metrics (Sec. 3.1) with patient-level bootstrap confidence intervals.

AUC comes from probabilities; the threshold metrics are reported at 0.5 (the paper's) and at
the threshold chosen on validation by Youden's J.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    y = np.asarray(y_true).astype(int)
    pred = (np.asarray(prob) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * prec * sens / (prec + sens) if prec + sens else 0.0
    return {
        "auc": float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan"),
        "accuracy": float((tp + tn) / len(y)),
        "sensitivity": float(sens),
        "specificity": float(spec),
        "precision": float(prec),
        "f1": float(f1),
        "threshold": float(threshold),
    }


def precision_recall_f1(y_true, pred, classes) -> dict:
    """Per class precision, recall, F1 and support, with their support-weighted and unweighted means
    (the ResNet50-ATT2 paper's Tables III-IV); an undefined precision (nothing predicted) counts 0."""
    y, pred = np.asarray(y_true).astype(int), np.asarray(pred).astype(int)
    labels = list(range(len(classes)))
    p, r, f, n = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out = {"per_class": {name: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                                "support": int(n[k])} for k, name in enumerate(classes)}}
    for average in ("weighted", "macro"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, labels=labels, average=average, zero_division=0)
        out[average] = {"precision": float(pa), "recall": float(ra), "f1": float(fa), "support": int(len(y))}
    return out


def multiclass_metrics(y_true, prob, classes) -> dict:
    """MAG-SD's multi-class metrics (Sec. IV-C, Eq. 8-11): accuracy, and per class one-vs-rest
    sensitivity, specificity, F1 and AUC, with their unweighted (macro) means."""
    y = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=float)
    pred = prob.argmax(1)
    k = len(classes)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    per_class = {}
    for c, name in enumerate(classes):
        tp = cm[c, c]
        fn, fp = cm[c].sum() - tp, cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        present = 0 < (y == c).sum() < len(y)
        per_class[name] = {
            "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
            "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
            "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else float("nan"),
            "auc": float(roc_auc_score(y == c, prob[:, c])) if present else float("nan"),
        }
    out = {"accuracy": float((pred == y).mean())}
    for key in ("sensitivity", "specificity", "f1", "auc"):
        out[f"macro_{key}"] = float(np.nanmean([per_class[n][key] for n in classes]))
    out["per_class"] = per_class
    out["precision_recall_f1"] = precision_recall_f1(y, pred, classes)
    out["confusion_matrix"] = cm.tolist()
    return out


def evaluate_multiclass(y_true, prob, groups, classes, n_boot: int = 1000, seed: int = 0) -> dict:
    """`multiclass_metrics` with patient-bootstrap 95% CIs of the headline values."""
    point = multiclass_metrics(y_true, prob, classes)
    headline = ("accuracy", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc")

    def values(y, p):
        m = multiclass_metrics(y, p, classes)
        return {key: m[key] for key in headline}

    cis = bootstrap_ci(y_true, prob, groups, values, n=n_boot, seed=seed, min_classes=len(classes))
    point.update({f"{k}_ci": v for k, v in cis.items()})
    return point


def youden_threshold(y_true, prob) -> float:
    """The threshold maximising sensitivity + specificity - 1 (to be chosen on validation)."""
    fpr, tpr, thresholds = roc_curve(np.asarray(y_true).astype(int), prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def lesion_metrics(y_true, prob, known, threshold: float = 0.5) -> dict:
    """Lesion accuracy and Hamming loss over images whose lesion labels are all known."""
    known_rows = np.asarray(known).all(axis=1)
    if not known_rows.any():
        return {"lesion_accuracy": float("nan"), "hamming_loss": float("nan"), "lesion_n": 0}
    y = np.asarray(y_true)[known_rows].astype(int)
    pred = (np.asarray(prob)[known_rows] >= threshold).astype(int)
    wrong = float((y != pred).mean())
    return {"lesion_accuracy": 1 - wrong, "hamming_loss": wrong, "lesion_n": int(known_rows.sum())}


def patient_resamples(groups, n: int, seed: int = 0):
    """Yield `n` index arrays, each a resample of whole patients with replacement."""
    uniq, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))])


def _percentiles(samples: dict, alpha: float) -> dict:
    return {key: [float(np.nanpercentile(v, 100 * alpha / 2)), float(np.nanpercentile(v, 100 * (1 - alpha / 2)))]
            for key, v in samples.items()}


def bootstrap_ci(y_true, prob, groups, metric, n: int = 1000, seed: int = 0, alpha: float = 0.05,
                 min_classes: int = 2) -> dict:
    """Percentile CIs of every value `metric(y, p)` returns, resampling patients with replacement;
    resamples with fewer than `min_classes` classes are skipped."""
    y, p = np.asarray(y_true), np.asarray(prob)
    samples: dict[str, list] = {}
    for idx in patient_resamples(groups, n, seed):
        if len(np.unique(y[idx])) < min_classes:
            continue
        for key, value in metric(y[idx], p[idx]).items():
            samples.setdefault(key, []).append(value)
    return _percentiles(samples, alpha)


def mean_with_ci(values, groups, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Mean of per-image values (NaN ignored) with a patient-bootstrap percentile CI."""
    v = np.asarray(values, dtype=float)
    if not np.isfinite(v).any():
        return {"mean": None, "ci": [None, None], "n": 0}
    means = [np.nanmean(v[idx]) if np.isfinite(v[idx]).any() else np.nan for idx in patient_resamples(groups, n, seed)]
    return {"mean": float(np.nanmean(v)), "ci": _percentiles({"m": means}, alpha)["m"], "n": int(np.isfinite(v).sum())}


def evaluate_binary(y_true, prob, groups, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics at 0.5 and at `threshold`, each with patient-bootstrap 95% CIs."""
    out = {}
    for tag, thr in (("at_0.5", 0.5), ("at_val_threshold", threshold)):
        point = binary_metrics(y_true, prob, thr)
        cis = bootstrap_ci(y_true, prob, groups, lambda y, p, t=thr: binary_metrics(y, p, t), n=n_boot, seed=seed)
        out[tag] = {k: v for k, v in point.items()}
        out[tag].update({f"{k}_ci": cis[k] for k in cis if k != "threshold"})
    return out


def multilabel_metrics(y_true, prob, known, labels, thresholds, min_positives: int = 10, mean_over=None) -> dict:
    """Per label (over the images whose label is known): AUC, and sensitivity, specificity, F1 at
    that label's threshold, with its positives; the means over the estimable labels (at least
    `min_positives` positives and one negative) of `mean_over` (default: all) as `macro_*`, the
    others marked not estimable instead of averaged in silently (AG-CNN's Table I reports the
    plain mean of the 14 diseases)."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(prob, dtype=float)
    k = np.ones_like(y, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    per_label = {}
    for j, name in enumerate(labels):
        rows = k[:, j]
        yj, pj = y[rows, j].astype(int), p[rows, j]
        positives, negatives = int(yj.sum()), int(len(yj) - yj.sum())
        m = binary_metrics(yj, pj, float(thresholds[j])) if len(yj) else {}
        per_label[name] = {
            "auc": m.get("auc", float("nan")) if positives and negatives else float("nan"),
            "sensitivity": m.get("sensitivity", float("nan")), "specificity": m.get("specificity", float("nan")),
            "f1": m.get("f1", float("nan")), "threshold": float(thresholds[j]),
            "positives": positives, "negatives": negatives,
            "estimable": positives >= min_positives and negatives > 0,
        }
    averaged = set(labels if not mean_over else mean_over)
    estimable = [n for n in labels if per_label[n]["estimable"] and n in averaged]
    out = {key: float(np.nanmean([per_label[n][key] for n in estimable])) if estimable else float("nan")
           for key in ("auc", "sensitivity", "specificity", "f1")}
    out = {f"macro_{k}": v for k, v in out.items()}
    out["estimable_labels"] = estimable
    out["per_label"] = per_label
    return out


def evaluate_multilabel(y_true, prob, known, groups, labels, thresholds, n_boot: int = 1000, seed: int = 0,
                        min_positives: int = 10, mean_over=None) -> dict:
    """`multilabel_metrics` with patient-bootstrap 95% CIs of each label's AUC and of the macro AUC."""
    point = multilabel_metrics(y_true, prob, known, labels, thresholds, min_positives, mean_over)
    if not n_boot:
        return point
    y, p = np.asarray(y_true, dtype=float), np.asarray(prob, dtype=float)
    k = np.ones_like(y, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    estimable = set(point["estimable_labels"])
    samples: dict[str, list] = {}
    for idx in patient_resamples(groups, n_boot, seed):
        aucs = {}
        for j, name in enumerate(labels):
            rows = idx[k[idx, j]]
            yj = y[rows, j]
            aucs[name] = float(roc_auc_score(yj, p[rows, j])) if len(np.unique(yj)) == 2 else np.nan
            samples.setdefault(name, []).append(aucs[name])
        macro = [aucs[n] for n in labels if n in estimable and np.isfinite(aucs[n])]
        samples.setdefault("macro_auc", []).append(float(np.mean(macro)) if macro else np.nan)
    finite = {key: v for key, v in samples.items() if np.isfinite(v).any()}
    cis = _percentiles(finite, 0.05)
    point["macro_auc_ci"] = cis.get("macro_auc", [None, None])
    for name in labels:
        point["per_label"][name]["auc_ci"] = cis.get(name, [None, None])
    return point
