"""Task kinds and model heads: what an output means, how it is trained, decided and scored.

A model declares named heads (`Head`), each one output of its forward dict with a task kind and
labels, and one primary head (the diagnosis the service reports). The task kind owns everything
that depends on what the output means, so no caller guesses it from a tensor's shape:

- `binary`: one logit per image (B,); sigmoid; binary cross entropy; positive when p >= the
  threshold chosen on validation (Youden's J); AUC, sensitivity, specificity, F1.
- `multiclass`: K logits (B, K); softmax; cross entropy; arg max; accuracy and one-vs-rest
  per-class metrics with their macro means (MAG-SD Eq. 8-11).
- `multilabel`: L logits (B, L); a sigmoid per label; binary cross entropy over the known
  (image, label) entries only (unknown = NaN in the manifest, as torchxrayvision's label
  matrix); a threshold per label; per-label and macro AUC (AG-CNN Eq. 1-2, Table I).

Targets arrive as (values, known) arrays: class indices (N,) for binary and multiclass heads,
0/1 values (N, L) for multilabel heads, with `known` marking the entries to learn from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from chestdx.errors import ChestDxError

TASK_KINDS = ("binary", "multiclass", "multilabel")
_EPS = 1e-6
SCORE_MIN_POSITIVES = 10  # a multilabel score averages labels with this many positives (evaluation's "estimable")


@dataclass(frozen=True)
class Head:
    """One output of a model: `output` names its key in the forward dict."""

    name: str
    task: str
    labels: tuple
    output: str = "logits"
    column: str = "label"  # the manifest column of a single-label head; a multilabel head reads one per label
    mean_over: tuple = ()  # the labels a multilabel head's mean AUC averages (empty: all)

    def __post_init__(self):
        if self.task not in TASK_KINDS:
            raise ValueError(f"head {self.name!r}: task {self.task!r} is not one of {TASK_KINDS}")
        if self.task == "binary" and len(self.labels) != 2:
            raise ValueError(f"binary head {self.name!r} needs (negative, positive) labels")
        if set(self.mean_over) - set(self.labels):
            raise ValueError(f"head {self.name!r}: mean_over names labels it does not have")

    @property
    def averaged(self) -> tuple:
        """The labels its mean score averages."""
        return tuple(self.mean_over) or tuple(self.labels)

    @property
    def kind(self) -> "Task":
        return TASKS[self.task]

    def score(self, y, probs, known=None) -> float:
        """The task's selection score; a multilabel head's mean over its `averaged` labels."""
        if self.task != "multilabel":
            return self.kind.score(y, probs, known)
        return self.kind.score(y, probs, known, columns=[self.labels.index(n) for n in self.averaged])

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels), "mean_over": list(self.mean_over)}

    @classmethod
    def from_dict(cls, d: dict) -> "Head":
        return cls(d["name"], d["task"], tuple(d["labels"]), d.get("output", "logits"), d.get("column", "label"),
                   tuple(d.get("mean_over", ())))


class Task:
    kind = ""

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits, target, known=None, label_smoothing: float = 0.0, class_weights=None) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """Logits whose probabilities are the mean of the members' (a deep ensemble)."""
        p = torch.stack([self.probabilities(lg) for lg in logits]).mean(0)
        return self.logits_of(p)

    def logits_of(self, p: torch.Tensor) -> torch.Tensor:
        p = p.clamp(_EPS, 1 - _EPS)
        return torch.log(p) - torch.log1p(-p)

    def decide(self, probs: np.ndarray, thresholds) -> np.ndarray:
        raise NotImplementedError

    def choose_thresholds(self, y, probs, known=None) -> list[float]:
        return [0.5]

    def score(self, y, probs, known=None) -> float:
        """The one number checkpoints are selected on: (macro) AUC; 0.5 where it is undefined."""
        raise NotImplementedError

    def stratify_key(self, y, known=None) -> np.ndarray:
        """One string per row for stratified, patient-grouped splitting."""
        return np.asarray(y).astype(str)

    def score_columns(self, logits: torch.Tensor) -> torch.Tensor:
        """The head as (B, K) columns for the CAM family, one per label."""
        return logits


class Binary(Task):
    kind = "binary"

    def probabilities(self, logits):
        return torch.sigmoid(logits)

    def loss(self, logits, target, known=None, label_smoothing: float = 0.0, class_weights=None):
        """Binary cross entropy; label smoothing moves targets towards 0.5; `class_weights` (negative,
        positive) weigh each image by its class (a weighted mean, as cross entropy's `weight`)."""
        if class_weights is None:
            return _masked_bce(logits, _smoothed(target, label_smoothing), known)
        w = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)[target.long()]
        if known is not None:
            w = w * known.to(w.dtype)
        per = F.binary_cross_entropy_with_logits(logits, _smoothed(target, label_smoothing), reduction="none")
        return (per * w).sum() / w.sum().clamp(min=1e-12)

    def decide(self, probs, thresholds):
        return (np.asarray(probs) >= float(_first(thresholds))).astype(int)

    def choose_thresholds(self, y, probs, known=None):
        from chestdx.evaluate.metrics import youden_threshold

        y = np.asarray(y)
        return [youden_threshold(y, probs) if len(np.unique(y)) == 2 else 0.5]

    def score(self, y, probs, known=None):
        y = np.asarray(y)
        return float(roc_auc_score(y, probs)) if len(np.unique(y)) == 2 else 0.5

    def score_columns(self, logits):
        # Two columns whose softmax is (1 - sigmoid(l), sigmoid(l)): either class can be a CAM target.
        return torch.stack([-logits / 2, logits / 2], dim=1)


class Multiclass(Task):
    kind = "multiclass"

    def probabilities(self, logits):
        return torch.softmax(logits, dim=1)

    def loss(self, logits, target, known=None, label_smoothing: float = 0.0, class_weights=None):
        if known is not None and not bool(known.all()):
            keep = known.bool()
            if not keep.any():
                return logits.sum() * 0.0
            logits, target = logits[keep], target[keep]
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=logits.dtype,
                                                                    device=logits.device)
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)

    def logits_of(self, p):
        return p.clamp_min(_EPS).log()

    def decide(self, probs, thresholds=None):
        return np.asarray(probs).argmax(1)

    def score(self, y, probs, known=None):
        y, probs = np.asarray(y), np.asarray(probs)
        if len(np.unique(y)) < probs.shape[1]:
            return 0.5
        return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


class Multilabel(Task):
    kind = "multilabel"

    def probabilities(self, logits):
        return torch.sigmoid(logits)

    def loss(self, logits, target, known=None, label_smoothing: float = 0.0, class_weights=None):
        """Binary cross entropy per label, averaged over the known (image, label) entries."""
        if class_weights is not None:
            raise ChestDxError("train.class_weights is for binary and multi-class heads")
        per_entry = F.binary_cross_entropy_with_logits(logits, _smoothed(target, label_smoothing), reduction="none")
        mask = torch.ones_like(per_entry) if known is None else known.float()
        return (per_entry * mask).sum() / mask.sum().clamp(min=1.0)

    def decide(self, probs, thresholds):
        t = np.asarray(thresholds, dtype=float).reshape(1, -1)
        return (np.asarray(probs) >= t).astype(int)

    def choose_thresholds(self, y, probs, known=None):
        from chestdx.evaluate.metrics import youden_threshold

        y, probs = np.asarray(y), np.asarray(probs)
        known = np.ones_like(y, dtype=bool) if known is None else np.asarray(known, dtype=bool)
        out = []
        for j in range(y.shape[1]):
            yj = y[known[:, j], j]
            out.append(youden_threshold(yj, probs[known[:, j], j]) if len(np.unique(yj)) == 2 else 0.5)
        return out

    def score(self, y, probs, known=None, columns=None, min_positives: int = SCORE_MIN_POSITIVES):
        """The mean AUC over the labels (of `columns`) with at least `min_positives` positives, as
        the evaluation's estimable labels: an AUC from one or two positives would decide the
        checkpoint by chance. Over every label with a positive when none has that many."""
        y, probs = np.asarray(y), np.asarray(probs)
        known = np.ones_like(y, dtype=bool) if known is None else np.asarray(known, dtype=bool)
        columns = range(y.shape[1]) if columns is None else columns
        aucs = per_label_auc(y, probs, known)
        positives = ((y > 0.5) & known).sum(0)
        finite = [j for j in columns if np.isfinite(aucs[j])]
        enough = [j for j in finite if positives[j] >= min_positives]
        chosen = enough or finite
        return float(np.mean([aucs[j] for j in chosen])) if chosen else 0.5

    def stratify_key(self, y, known=None):
        # Rows grouped by their rarest positive label keeps rare labels spread over the folds.
        y = np.asarray(y)
        known = np.ones_like(y, dtype=bool) if known is None else np.asarray(known, dtype=bool)
        positive = (y > 0.5) & known
        freq = positive.sum(0)
        keys = []
        for row in positive:
            labels = np.flatnonzero(row)
            keys.append("none" if not len(labels) else str(labels[np.argmin(freq[labels])]))
        return np.asarray(keys)


def balanced_class_weights(y, known, n_classes: int) -> list[float]:
    """w_c = N / (K N_c): inversely proportional to each class's frequency among the known labels,
    1 on average over the images (scikit-learn's "balanced"); a class without images gets 0."""
    y = np.asarray(y)[np.asarray(known, dtype=bool)].astype(int)
    counts = np.bincount(y, minlength=n_classes).astype(float)
    return [float(len(y) / (n_classes * c)) if c else 0.0 for c in counts]


def per_label_auc(y, probs, known=None) -> list[float]:
    y, probs = np.asarray(y), np.asarray(probs)
    known = np.ones_like(y, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    out = []
    for j in range(y.shape[1]):
        yj = y[known[:, j], j]
        out.append(float(roc_auc_score(yj, probs[known[:, j], j])) if len(np.unique(yj)) == 2 else float("nan"))
    return out


def _smoothed(target, label_smoothing: float):
    target = target.float()
    return target * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else target


def _masked_bce(logits, target, known):
    if known is None or bool(known.all()):
        return F.binary_cross_entropy_with_logits(logits, target)
    mask = known.float()
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def _first(thresholds):
    if isinstance(thresholds, (list, tuple, np.ndarray)):
        return thresholds[0]
    return thresholds


TASKS = {t.kind: t for t in (Binary(), Multiclass(), Multilabel())}


def get_task(kind: str) -> Task:
    if kind not in TASKS:
        raise ChestDxError(f"unknown task kind {kind!r}; choose from {', '.join(TASK_KINDS)}")
    return TASKS[kind]


def heads_from(bundle_or_list) -> list[Head]:
    """Heads from a bundle (or its `heads` list of dicts)."""
    items = bundle_or_list["heads"] if isinstance(bundle_or_list, dict) else bundle_or_list
    return [h if isinstance(h, Head) else Head.from_dict(h) for h in items]


def head_by_name(heads, name: str) -> Head:
    for h in heads:
        if h.name == name:
            return h
    raise ChestDxError(f"no head named {name!r}; the model has {', '.join(h.name for h in heads)}")
