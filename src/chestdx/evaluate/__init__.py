"""Evaluation: the papers' metrics with confidence intervals, figures and reports."""

from chestdx.evaluate.metrics import binary_metrics, bootstrap_ci, evaluate_binary, lesion_metrics, youden_threshold

__all__ = ["binary_metrics", "bootstrap_ci", "evaluate_binary", "lesion_metrics", "youden_threshold"]
