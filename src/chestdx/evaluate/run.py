"""Evaluate a model bundle on a named dataset's val and test splits and write the report."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from chestdx.data.dataset import ManifestDataset
from chestdx.data.datasets import get_dataset
from chestdx.data.transforms import Compose, build_pipeline
from chestdx.evaluate.metrics import evaluate_binary, evaluate_multiclass, lesion_metrics, multiclass_metrics
from chestdx.evaluate.plots import plot_confusion, plot_pr, plot_roc
from chestdx.evaluate.report import write_report
from chestdx.inference import Predictor
from chestdx.utils import atomic_path, write_json_atomic


def predict_split(predictor: Predictor, manifest, extra_load_steps=(), batch_size: int = 32) -> dict:
    load, sample = build_pipeline(predictor.bundle["preprocess"], train=False)
    load = Compose([*extra_load_steps, *load.steps])
    data = ManifestDataset(manifest, load, sample)
    probs, lesions = [], []
    for start in range(0, len(data), batch_size):
        x = torch.stack([data[i]["image"] for i in range(start, min(len(data), start + batch_size))])
        out = predictor.predict_tensor(x)
        probs.append(out["probability"])
        if "lesions" in out:
            lesions.append(out["lesions"])
    return {
        "prob": np.concatenate(probs),
        "lesions": np.concatenate(lesions) if lesions else None,
        "y": data.targets,
        "lesion_y": data.extra,
        "lesion_known": data.extra_known,
        "patients": data.patients,
        "paths": list(manifest.frame["path"]),
        "sources": list(manifest.frame["source"]) if "source" in manifest.frame.columns else None,
    }


class JPEGRecode:
    """Load-time step: every image re-encoded as JPEG (quality 75), as a shortcut probe."""

    def __call__(self, image, rng=None):
        u8 = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
        _, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, 75])
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


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
    if predictor.multiclass:
        return _evaluate_multiclass(predictor, info, splits, out_dir, n_boot)
    test, val = splits["test"], splits["val"]
    threshold = predictor.threshold

    metrics = {
        "model": bundle["registry_name"], "backbone": bundle["model_kwargs"]["backbone"],
        "dataset": info.name, "data_fingerprint": bundle.get("data_fingerprint"),
        "n_test": int(len(test["y"])), "n_test_patients": int(len(set(test["patients"]))),
        "threshold_from_validation": threshold,
        "validation": evaluate_binary(val["y"], val["prob"], val["patients"], threshold, n_boot=200)["at_0.5"],
        "test": evaluate_binary(test["y"], test["prob"], test["patients"], threshold, n_boot=n_boot),
    }
    if test["lesions"] is not None:
        metrics["test_lesions"] = lesion_metrics(test["lesion_y"], test["lesions"], test["lesion_known"])
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
    _write_predictions(test, bundle, threshold, out_dir / "predictions_test.csv")
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_report(metrics, cfg, out_dir)
    return metrics


def _evaluate_multiclass(predictor: Predictor, info, splits: dict, out_dir: Path, n_boot: int) -> dict:
    """MAG-SD's metrics on the test split (validation for reference), per source too, plots and report."""
    bundle = predictor.bundle
    classes = list(bundle["classes"])
    test, val = splits["test"], splits["val"]
    metrics = {
        "model": bundle["registry_name"], "backbone": bundle["model_kwargs"]["backbone"],
        "dataset": info.name, "data_fingerprint": bundle.get("data_fingerprint"), "classes": classes,
        "n_test": int(len(test["y"])), "n_test_patients": int(len(set(test["patients"]))),
        "validation": multiclass_metrics(val["y"], val["prob"], classes),
        "test": evaluate_multiclass(test["y"], test["prob"], test["patients"], classes, n_boot=n_boot),
    }
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


def _write_predictions(split: dict, bundle: dict, threshold: float, path) -> None:
    frame = pd.DataFrame({"path": split["paths"], "patient_id": split["patients"],
                          "true": [bundle["classes"][i] for i in split["y"]], "p_covid": split["prob"],
                          "predicted": np.where(split["prob"] >= threshold, bundle["classes"][1], bundle["classes"][0])})
    if split["lesions"] is not None:
        for j, name in enumerate(bundle["lesions"]):
            frame[f"p_{name}"] = split["lesions"][:, j]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.5f")
