"""Calibration: temperature scaling fitted on validation, and the numbers that say how far a
model's probabilities are from the frequencies they claim (Guo et al., ICML 2017).

Temperature scaling divides the logits by one T > 0 before the sigmoid or softmax. It is fitted
here on the probabilities the bundle already produces (ensemble-averaged, with test-time views):
log p is a logit up to a constant for the softmax, logit(p) is the logit for the sigmoid, so
p -> sigmoid(logit(p) / T) and p -> softmax(log p / T) work the same for one model, an ensemble and
an ONNX export. T is monotone in p, so AUC and any ranking are unchanged; only the claimed
confidence moves.

ECE: the mean over equal-width confidence bins of |accuracy - confidence|, weighted by the bin's
share of cases (15 bins; the binary case bins p(positive) against the positive rate).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

EPS = 1e-12  # probabilities are clipped here before the logit; float64 keeps their order
BINS = 15


def _logits(prob: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p)) if p.ndim == 1 else np.log(p)


def apply_temperature(prob, temperature: float) -> np.ndarray:
    """Probabilities (N,) of the positive class or (N, K) over classes, as if the logits were / T."""
    z = _logits(prob) / float(temperature)
    if z.ndim == 1:
        return 1 / (1 + np.exp(-z))
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def negative_log_likelihood(y, prob) -> float:
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(prob, dtype=np.float64), EPS, 1 - EPS)
    if p.ndim == 1:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def fit_temperature(y, prob) -> float:
    """The T that minimises the validation negative log-likelihood (searched over log T in [-3, 3])."""
    result = minimize_scalar(lambda log_t: negative_log_likelihood(y, apply_temperature(prob, np.exp(log_t))),
                             bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(result.x))


def reliability_bins(y, prob, bins: int = BINS) -> dict:
    """Per equal-width bin: mean confidence, observed frequency, count (empty bins left out)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 1:
        confidence, correct = p, y.astype(float)
    else:
        confidence, correct = p.max(1), (p.argmax(1) == y).astype(float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [(confidence[which == b].mean(), correct[which == b].mean(), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]
    conf, freq, count = (np.array(c) for c in zip(*rows)) if rows else (np.zeros(0),) * 3
    return {"confidence": conf, "frequency": freq, "count": count}


def expected_calibration_error(y, prob, bins: int = BINS) -> float:
    r = reliability_bins(y, prob, bins)
    total = r["count"].sum()
    return float((np.abs(r["frequency"] - r["confidence"]) * r["count"]).sum() / total) if total else float("nan")


def brier_score(y, prob) -> float:
    """Mean squared error of the probabilities (binary: of p(positive); multi-class: summed over classes)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 1:
        return float(np.mean((p - y) ** 2))
    return float(np.mean(((p - np.eye(p.shape[1])[y]) ** 2).sum(1)))


def calibration_summary(y, prob) -> dict:
    return {"ece": expected_calibration_error(y, prob), "brier": brier_score(y, prob),
            "nll": negative_log_likelihood(y, prob), "n": int(len(np.asarray(y)))}
