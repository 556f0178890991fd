"""Evaluate a model bundle on a named dataset's val and test splits and write the report."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from chestdx.data.dataset import ManifestDataset, reader_for
from chestdx.data.datasets import get_dataset
from chestdx.data.transforms import Compose, build_pipeline
from chestdx.evaluate.metrics import (evaluate_binary, evaluate_multiclass, evaluate_multilabel, lesion_metrics,
                                     multiclass_metrics, precision_recall_f1)
from chestdx.evaluate.plots import plot_confusion, plot_pr, plot_roc
from chestdx.evaluate.report import write_report
from chestdx.errors import ChestDxError
from chestdx.inference import Predictor
from chestdx.utils import atomic_path, write_json_atomic


def predict_split(predictor: Predictor, manifest, extra_load_steps=(), batch_size: int = 32) -> dict:
    """Each head's probabilities and targets on one split (probabilities under `probs[head]`)."""
    load, sample = build_pipeline(predictor.bundle["preprocess"], train=False, spatial_dims=predictor.spatial_dims)
    load = Compose([*extra_load_steps, *load.steps])
    data = ManifestDataset(manifest, predictor.heads, load, sample,
                           read=reader_for(predictor.sample, predictor.bundle["preprocess"]))
    chunks = {h.name: [] for h in predictor.heads}
    for start in range(0, len(data), batch_size):
        x = torch.stack([data[i]["image"] for i in range(start, min(len(data), start + batch_size))])
        for name, p in predictor.predict_tensor(x).items():
            chunks[name].append(p)
    primary = predictor.primary.name
    out = {
        "probs": {name: np.concatenate(c) for name, c in chunks.items()},
        "targets": {h.name: data.head_arrays(h.name) for h in predictor.heads},
        "patients": data.patients,
        "paths": list(manifest.frame["path"]),
        "sources": list(manifest.frame["source"]) if "source" in manifest.frame.columns else None,
    }
    out["prob"], (out["y"], out["known"]) = out["probs"][primary], out["targets"][primary]
    return out


def calibrate_bundle(bundle_path, dataset: str | None = None, manifest=None) -> dict:
    """Fit the primary head's temperature on the validation split and store it in the bundle (for a
    bundle trained before training did this itself); the operating thresholds move with it, so every
    decision stays what it was. Returns the bundle's calibration entry."""
    import torch

    from chestdx.evaluate.calibration import apply_temperature
    from chestdx.models.bundle import save_bundle
    from chestdx.train.run import fit_calibration

    predictor = Predictor(bundle_path)
    if predictor.backend != "pytorch" or predictor.primary.task == "multilabel":
        raise ChestDxError(f"{bundle_path}: calibration is fitted on a .pt bundle with a binary or multi-class "
                           f"primary head")
    info = get_dataset(dataset or predictor.bundle["config"]["dataset"])
    manifest = manifest if manifest is not None else info.manifest()
    predictor.temperature = {}  # fit on the raw probabilities, even when the bundle has a temperature
    val = predict_split(predictor, manifest.subset("val"))
    calibration = {"head": predictor.primary.name, **fit_calibration(val["y"], val["prob"], val["known"])}
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=False)
    old = (bundle.get("calibration") or {}).get("temperature", 1.0)
    t = bundle.get("thresholds", {}).get(predictor.primary.name)
    if t and predictor.primary.task == "binary":  # a threshold on the old scale -> the same decision on the new
        raw = apply_temperature(np.asarray(t, dtype=float), 1 / old)
        bundle["thresholds"][predictor.primary.name] = [float(v) for v in
                                                        apply_temperature(raw, calibration["temperature"])]
    bundle["calibration"] = calibration
    save_bundle(bundle, bundle_path)
    return calibration


class JPEGRecode:
    """Load-time step: every image (each channel) re-encoded as JPEG (quality 75), as a shortcut probe."""

    keys = ("image",)

    def __call__(self, sample, rng=None):
        u8 = np.clip(sample["image"] * 255 + 0.5, 0, 255).astype(np.uint8)
        channels = [cv2.imdecode(cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 75])[1], cv2.IMREAD_GRAYSCALE)
                    for c in u8]
        return {**sample, "image": np.stack(channels).astype(np.float32) / 255}


def evaluate_bundle(bundle_path, out_dir, dataset: str | None = None, n_boot: int = 1000,
                    shortcut_probe: bool = True, limit: int = 0, manifest=None) -> dict:
    """`manifest`: evaluate on its val/test splits instead of the named dataset's (e.g. a CV fold)."""
    predictor = Predictor(bundle_path)
    bundle = predictor.bundle
    cfg = bundle["config"]
    info = get_dataset(dataset or cfg["dataset"])
    manifest = manifest if manifest is not None else info.manifest()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def rows(split):
        sub = manifest.subset(split)
        return sub.take(range(min(limit, len(sub)))) if limit else sub

    splits = {split: predict_split(predictor, rows(split)) for split in ("val", "test")}
    task = predictor.primary.task
    if task == "multiclass":
        return _evaluate_multiclass(predictor, info, splits, out_dir, n_boot)
    if task == "multilabel":
        return _evaluate_multilabel(predictor, info, splits, out_dir, n_boot)
    test, val = splits["test"], splits["val"]
    threshold = predictor.threshold

    metrics = {
        "task": task, "primary": predictor.primary.name,
        "model": bundle["registry_name"], "backbone": bundle["model_kwargs"].get("backbone"),
        "dataset": info.name, "data_fingerprint": bundle.get("data_fingerprint"),
        "n_test": int(len(test["y"])), "n_test_patients": int(len(set(test["patients"]))),
        "threshold_from_validation": threshold,
        "validation": evaluate_binary(val["y"], val["prob"], val["patients"], threshold, n_boot=200)["at_0.5"],
        "test": evaluate_binary(test["y"], test["prob"], test["patients"], threshold, n_boot=n_boot),
        "test_precision_recall_f1": precision_recall_f1(test["y"], test["prob"] >= threshold, bundle["classes"]),
    }
    metrics["calibration"] = calibration_report(predictor, val, test, out_dir)
    for head in predictor.heads:  # auxiliary multi-label heads (LA-DNN's lesions)
        if head.name != predictor.primary.name and head.task == "multilabel":
            y, known = test["targets"][head.name]
            metrics[f"test_{head.name}"] = lesion_metrics(y, test["probs"][head.name], known)
    curves = {"test": (test["y"], test["prob"])}
    if shortcut_probe:
        recoded = predict_split(predictor, rows("test"), extra_load_steps=[JPEGRecode()])
        metrics["shortcut_probe"] = {
            "description": "test AUC when every test image is re-encoded as JPEG q75 before inference; "
                           "a large drop means the model keys on file format "
                           "(COVID images are .png files, half the negatives .jpg)",
            "auc_original": metrics["test"]["at_0.5"]["auc"],
            "auc_all_jpeg": evaluate_binary(recoded["y"], recoded["prob"], recoded["patients"], 0.5,
                                            n_boot=200)["at_0.5"]["auc"],
        }
        curves["test, all re-encoded as JPEG"] = (recoded["y"], recoded["prob"])

    plot_roc(curves, out_dir / "roc.png", title=f"{bundle['registry_name']} on {info.name} test")
    plot_pr({"test": curves["test"]}, out_dir / "pr.png")
    plot_confusion(test["y"], (test["prob"] >= 0.5).astype(int), bundle["classes"], out_dir / "confusion.png",
                   title="Test, threshold 0.5")
    _write_predictions(test, predictor, threshold, out_dir / "predictions_test.csv")
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_report(metrics, cfg, out_dir)
    return metrics


def _evaluate_multiclass(predictor: Predictor, info, splits: dict, out_dir: Path, n_boot: int) -> dict:
    """MAG-SD's metrics on the test split (validation for reference), per source too, plots and report."""
    bundle = predictor.bundle
    classes = list(bundle["classes"])
    test, val = splits["test"], splits["val"]
    metrics = {
        "task": "multiclass", "primary": predictor.primary.name,
        "model": bundle["registry_name"], "backbone": bundle["model_kwargs"].get("backbone"),
        "dataset": info.name, "data_fingerprint": bundle.get("data_fingerprint"), "classes": classes,
        "n_test": int(len(test["y"])), "n_test_patients": int(len(set(test["patients"]))),
        "validation": multiclass_metrics(val["y"], val["prob"], classes),
        "test": evaluate_multiclass(test["y"], test["prob"], test["patients"], classes, n_boot=n_boot),
    }
    metrics["calibration"] = calibration_report(predictor, val, test, out_dir)
    if test["sources"] is not None:
        metrics["test_by_source"] = per_source(test, classes)
    curves = {f"{name} vs rest": (test["y"] == k, test["prob"][:, k]) for k, name in enumerate(classes)}
    plot_roc(curves, out_dir / "roc.png", title=f"{bundle['registry_name']} on {info.name} test")
    plot_pr(curves, out_dir / "pr.png")
    plot_confusion(test["y"], test["prob"].argmax(1), classes, out_dir / "confusion.png", title="Test, arg max")
    frame = pd.DataFrame({"path": test["paths"], "patient_id": test["patients"],
                          "true": [classes[i] for i in test["y"]],
                          "predicted": [classes[i] for i in test["prob"].argmax(1)]})
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = test["prob"][:, k]
    if test["sources"] is not None:
        frame["source"] = test["sources"]
    with atomic_path(out_dir / "predictions_test.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.5f")
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_report(metrics, bundle["config"], out_dir)
    return metrics


def calibration_report(predictor: Predictor, val: dict, test: dict, out_dir: Path) -> dict:
    """ECE, Brier score and NLL on validation and test with the bundle's temperature (if any), and the
    reliability diagram (reliability.png)."""
    from chestdx.evaluate.calibration import calibration_summary
    from chestdx.evaluate.plots import plot_reliability

    curves = {}
    for name, split in (("validation", val), ("test", test)):
        known = np.asarray(split["known"]).reshape(len(split["y"]), -1).all(1)
        curves[name] = (np.asarray(split["y"])[known], np.asarray(split["prob"])[known])
    plot_reliability(curves, out_dir / "reliability.png", title="Reliability")
    return {"temperature": predictor.temperature.get(predictor.primary.name),
            **{name: calibration_summary(y, p) for name, (y, p) in curves.items()}}


def per_source(split: dict, classes) -> dict:
    """Accuracy and per-class recall within each source: label and source are confounded in
    cxr-covid, so a high overall score can hide a source detector."""
    y, pred, sources = np.asarray(split["y"]), split["prob"].argmax(1), np.asarray(split["sources"])
    out = {}
    for source in sorted(set(sources)):
        rows = sources == source
        recall = {classes[k]: {"n": int((y[rows] == k).sum()),
                               "recall": float((pred[rows][y[rows] == k] == k).mean())}
                  for k in range(len(classes)) if (y[rows] == k).any()}
        out[source] = {"n": int(rows.sum()), "accuracy": float((pred[rows] == y[rows]).mean()), "by_class": recall}
    return out


def _write_predictions(split: dict, predictor: Predictor, threshold: float, path) -> None:
    labels = predictor.primary.labels
    frame = pd.DataFrame({"path": split["paths"], "patient_id": split["patients"],
                          "true": [labels[i] for i in split["y"]], f"p_{labels[1]}": split["prob"],
                          "predicted": np.where(split["prob"] >= threshold, labels[1], labels[0])})
    for head in predictor.heads:
        if head.name != predictor.primary.name and head.task == "multilabel":
            for j, name in enumerate(head.labels):
                frame[f"p_{name}"] = split["probs"][head.name][:, j]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.5f")


def _multilabel(head, predictor: Predictor, split: dict, n_boot: int) -> dict:
    y, known = split["targets"][head.name]
    return evaluate_multilabel(y, split["probs"][head.name], known, split["patients"], head.labels,
                               predictor.thresholds[head.name], n_boot=n_boot, mean_over=head.averaged)


def _evaluate_multilabel(predictor: Predictor, info, splits: dict, out_dir: Path, n_boot: int) -> dict:
    """Per-label and macro metrics at the per-label thresholds chosen on validation, with patient-bootstrap CIs."""
    bundle, head = predictor.bundle, predictor.primary
    test, val = splits["test"], splits["val"]
    thresholds = predictor.thresholds[head.name]
    metrics = {
        "task": "multilabel", "primary": head.name,
        "model": bundle["registry_name"], "backbone": bundle["model_kwargs"].get("backbone"),
        "dataset": info.name, "data_fingerprint": bundle.get("data_fingerprint"), "labels": list(head.labels),
        "n_test": int(len(test["y"])), "n_test_patients": int(len(set(test["patients"]))),
        "thresholds_from_validation": dict(zip(head.labels, thresholds)),
        "mean_over": list(head.averaged),
        "validation": _multilabel(head, predictor, val, n_boot=0),
        "test": _multilabel(head, predictor, test, n_boot=n_boot),
    }
    others = [h for h in predictor.heads if h.task == "multilabel" and h.name != head.name]
    if others:  # e.g. AG-CNN's global and local branches, each a head
        metrics["validation_heads"] = {h.name: _multilabel(h, predictor, val, n_boot=0) for h in others}
        metrics["test_heads"] = {h.name: _multilabel(h, predictor, test, n_boot=n_boot) for h in others}
    curves = {name: (test["y"][test["known"][:, j] > 0, j], test["prob"][test["known"][:, j] > 0, j])
              for j, name in enumerate(head.labels)}
    curves = {name: y_p for name, y_p in curves.items() if len(np.unique(y_p[0])) == 2}
    plot_roc(curves, out_dir / "roc.png", title=f"{bundle['registry_name']} on {info.name} test")
    frame = pd.DataFrame({"path": test["paths"], "patient_id": test["patients"]})
    for j, name in enumerate(head.labels):
        frame[f"true_{name}"] = np.where(test["known"][:, j] > 0, test["y"][:, j], np.nan)
        frame[f"p_{name}"] = test["prob"][:, j]
    with atomic_path(out_dir / "predictions_test.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.5f")
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_report(metrics, bundle["config"], out_dir)
    return metrics
