"""Patient-level K-fold cross-validation of one experiment config.

Fold k tests on fold k, selects the checkpoint (and the Youden threshold) on fold k+1 and trains
on the rest (`chestdx.data.splits.kfold_split_tags`), so every image is tested exactly once and
no patient crosses splits. Folds are stratified by label, and by source where the manifest has
a `source` column (mixed-source CXR sets). Each fold is an ordinary run folder, so a killed
cross-validation resumes: finished folds are kept, the interrupted one resumes from its last
checkpoint; folds made with other settings or data are refused (`chestdx.train.runfolder`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd

from chestdx.data.datasets import get_dataset
from chestdx.data.manifest import Manifest
from chestdx.data.splits import kfold_split_tags, leave_source_out_tags, publication_groups
from chestdx.errors import ChestDxError
from chestdx.models import get_entry
from chestdx.evaluate.run import evaluate_bundle
from chestdx.train import runfolder
from chestdx.train.run import fit, is_main_process, prepare_config, split_manifests
from chestdx.utils import write_json_atomic

BINARY_HEADLINE = ("auc", "accuracy", "sensitivity", "specificity", "f1")
MULTICLASS_HEADLINE = ("macro_auc", "accuracy", "macro_sensitivity", "macro_specificity", "macro_f1")
MULTILABEL_HEADLINE = ("macro_auc", "macro_sensitivity", "macro_specificity", "macro_f1")


def fold_manifests(manifest: Manifest, n_folds: int, seed: int = 0, head=None,
                   group_by: str = "patient") -> list[Manifest]:
    """The manifest once per fold, its `split` column replaced by that fold's train/val/test tags;
    stratified by the primary head's task key (`head`; the label column when none is given). A fold keeps
    each patient together, or with group_by="publication" each publication its figures were cut from
    (`chestdx.data.splits.publication_groups`), which holds whole sources out of a set without a source column."""
    _check_fold_count(n_folds)
    frame = manifest.frame
    if head is None:
        strata = frame[manifest.label_column].astype(str)
    else:
        strata = pd.Series(head.kind.stratify_key(*manifest.head_targets(head)), index=frame.index)
    if "source" in frame.columns:
        strata = strata + "/" + frame["source"].astype(str)
    tags = kfold_split_tags(strata.to_numpy(), fold_groups(frame, group_by), n_folds, seed=seed)
    return [Manifest(frame.assign(split=t), manifest.root, manifest.label_column, manifest.classes,
                     manifest.extra_labels) for t in tags]


GROUPINGS = ("patient", "publication")


def fold_groups(frame: pd.DataFrame, group_by: str) -> np.ndarray:
    """The group each row's fold is chosen by (see `fold_manifests`)."""
    if group_by not in GROUPINGS:
        raise ChestDxError(f"--group-by {group_by!r}: use one of {', '.join(GROUPINGS)}")
    if group_by == "publication":
        return publication_groups(frame["path"], frame["patient_id"])
    return frame["patient_id"].to_numpy()


def cross_validate(cfg: dict, run_dir, n_folds: int, progress: bool = True, n_boot: int = 200,
                   group_by: str = "patient") -> dict:
    """Train and test every fold in `<run_dir>/fold<k>`; write and return `<run_dir>/cv_summary.json`
    (per-fold test metrics at threshold 0.5, their mean and standard deviation). `group_by`: what a
    fold keeps together (`fold_manifests`)."""
    _check_fold_count(n_folds)
    run_dir = Path(run_dir)
    manifest = get_dataset(cfg["dataset"]).manifest()
    folds = []
    head = get_entry(cfg["model"]["name"]).primary_head
    folds_of = fold_manifests(manifest, n_folds, seed=int(cfg["train"]["seed"]), head=head, group_by=group_by)
    for k, fold in enumerate(folds_of):
        fold_dir = run_dir / f"fold{k}"
        fold_cfg = prepare_config(copy.deepcopy(cfg))
        runfolder.check(fold_dir, fold_cfg, split_manifests(fold_cfg, fold)[1])  # another run's fold is refused
        done = fold_dir / "eval" / "metrics.json"
        if done.is_file() and runfolder.finished(fold_dir, fold_cfg):
            metrics = json.loads(done.read_text())
        else:
            model_path = fit(fold_cfg, fold_dir, progress, manifest=fold)
            if not is_main_process():  # a DDP worker trains the folds; rank 0 tests them
                continue
            metrics = evaluate_bundle(model_path, fold_dir / "eval", n_boot=n_boot, shortcut_probe=False,
                                      manifest=fold)
        folds.append(_headline(metrics))
    if not is_main_process():
        return {}
    summary = {"config": cfg["name"], "dataset": cfg["dataset"], "n_folds": n_folds, "group_by": group_by,
               "threshold": 0.5, "folds": folds, "mean": {}, "sd": {}}
    for key in (k for k in folds[0] if k != "n_test"):
        values = np.array([f[key] for f in folds], dtype=float)
        summary["mean"][key] = float(values.mean())
        summary["sd"][key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    write_json_atomic(run_dir / "cv_summary.json", summary)
    return summary


def source_out_manifests(manifest: Manifest, column: str = "source", seed: int = 0) -> dict:
    """{source: the manifest with its split column set so that source is the test split}."""
    frame = manifest.frame
    if column not in frame.columns:
        raise ChestDxError(f"leave-one-source-out needs a '{column}' column in the manifest")
    tags = leave_source_out_tags(frame[manifest.label_column].astype(str), frame["patient_id"], frame[column],
                                 seed=seed)
    return {source: Manifest(frame.assign(split=t), manifest.root, manifest.label_column, manifest.classes,
                             manifest.extra_labels) for source, t in tags.items()}


def leave_source_out(cfg: dict, run_dir, column: str = "source", progress: bool = True, n_boot: int = 200,
                     only=None) -> dict:
    """Train without each source and test on it, in `<run_dir>/without_<source>`; resumable like the folds.
    Returns and writes `<run_dir>/source_out_summary.json` with each held-out source's test metrics."""
    run_dir = Path(run_dir)
    manifest = get_dataset(cfg["dataset"]).manifest()
    summary = {"config": cfg["name"], "dataset": cfg["dataset"], "column": column, "sources": {}}
    for source, held_out in source_out_manifests(manifest, column, seed=int(cfg["train"]["seed"])).items():
        if only and source not in only:
            continue
        fold_dir = run_dir / f"without_{source}"
        fold_cfg = prepare_config(copy.deepcopy(cfg))
        runfolder.check(fold_dir, fold_cfg, split_manifests(fold_cfg, held_out)[1])
        done = fold_dir / "eval" / "metrics.json"
        if done.is_file() and runfolder.finished(fold_dir, fold_cfg):
            metrics = json.loads(done.read_text())
        else:
            model_path = fit(fold_cfg, fold_dir, progress, manifest=held_out)
            if not is_main_process():
                continue
            metrics = evaluate_bundle(model_path, fold_dir / "eval", n_boot=n_boot, shortcut_probe=False,
                                      manifest=held_out)
        summary["sources"][source] = {"n_test": metrics["n_test"], "test": metrics["test"],
                                      "train_sources": sorted(set(held_out.frame[column]) - {source})}
    if is_main_process():
        write_json_atomic(run_dir / "source_out_summary.json", summary)
    return summary


def _check_fold_count(n_folds: int) -> None:
    if n_folds < 3:  # one fold tests, the next selects: fewer than three leaves nothing to train on
        raise ChestDxError(f"{n_folds} folds: cross-validation needs at least 3 (test, validation, training)")


def _headline(metrics: dict) -> dict:
    test = metrics["test"]
    if metrics["task"] == "binary":
        return {k: float(test["at_0.5"][k]) for k in BINARY_HEADLINE} | {"n_test": metrics["n_test"]}
    keys = MULTICLASS_HEADLINE if metrics["task"] == "multiclass" else MULTILABEL_HEADLINE
    return {k: float(test[k]) for k in keys} | {"n_test": metrics["n_test"]}
