"""Train one experiment: data, Lightning Trainer, best-on-validation checkpoint, model bundle.

A run folder holds Lightning's checkpoints (`last.ckpt` every epoch, `best.ckpt` on
validation AUC), CSV logs (a new `logs/version_N` per invocation, so a resumed run keeps the
earlier epochs' log) and the final `model.pt` bundle. Re-running the same command after
a kill resumes from `last.ckpt`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from chestdx.data.dataset import ManifestDataset
from chestdx.data.datasets import get_dataset
from chestdx.data.transforms import build_pipeline, tta_views
from chestdx.evaluate.metrics import youden_threshold
from chestdx.models.backbones import grey_normalisation
from chestdx.models.bundle import load_bundle, make_bundle, save_bundle
from chestdx.models.ensemble import Ensemble
from chestdx.train import runfolder
from chestdx.train.memory import keep_freed_memory
from chestdx.train.module import ClassifierModule, class_probabilities, macro_auc, predicted_class
from chestdx.utils import write_json_atomic


def prepare_config(cfg: dict) -> dict:
    """Fill in the backbone's input normalisation (idempotent), so every record of the config agrees."""
    cfg["preprocess"] = {**grey_normalisation(cfg["model"]["backbone"]), **cfg["preprocess"]}
    return cfg


def split_manifests(cfg: dict, manifest=None) -> tuple[dict, str]:
    """The train and val manifests (the config's dataset, or `manifest`, e.g. one CV fold) and their
    fingerprint; cheap, since no image is read."""
    manifest = manifest if manifest is not None else get_dataset(cfg["dataset"]).manifest()
    limit = int(cfg["train"].get("limit_per_split") or 0)
    subsets = {}
    for split in ("train", "val"):
        sub = manifest.subset(split)
        if limit:
            rng = np.random.default_rng(cfg["train"]["seed"])
            sub = sub.take(sorted(rng.choice(len(sub), size=min(limit, len(sub)), replace=False)))
        subsets[split] = sub
    return subsets, f"{subsets['train'].fingerprint()}-{subsets['val'].fingerprint()}"


def build_datasets(cfg: dict, progress: bool = True, manifest=None) -> dict:
    """Train and val datasets of the config's named dataset, or of `manifest` (e.g. one CV fold)."""
    pre = prepare_config(cfg)["preprocess"]
    subsets, fingerprint = split_manifests(cfg, manifest)
    out = {"fingerprint": fingerprint}
    for split, sub in subsets.items():
        load, sample = build_pipeline(pre, train=split == "train", aug=cfg["augment"])
        out[split] = ManifestDataset(sub, load, sample, seed=cfg["train"]["seed"], progress=progress)
    return out


def fit(cfg: dict, run_dir, progress: bool = True, datasets: dict | None = None, manifest=None) -> Path:
    """Train (or resume) and write `<run_dir>/model.pt`; returns its path.

    `manifest` replaces the config's dataset splits (e.g. one cross-validation fold); `datasets`
    passes ready-built ones (single models only).
    `train.ensemble: K` (> 1) trains K members from seeds seed, seed+1, ... in
    `<run_dir>/member_<k>` and bundles them as one seed ensemble (models/ensemble.py)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    prepare_config(cfg)
    if int(cfg["train"].get("ensemble") or 1) > 1:
        if datasets is not None:  # each member builds its own, seeded by its seed
            raise ValueError("fit(datasets=...) is for single models; pass manifest= for an ensemble")
        return _fit_ensemble(cfg, run_dir, progress, manifest)
    t = cfg["train"]
    fingerprint = datasets["fingerprint"] if datasets is not None else split_manifests(cfg, manifest)[1]
    runfolder.claim(run_dir, cfg, fingerprint)  # before any image is read
    L.seed_everything(t["seed"], workers=True, verbose=False)
    data = datasets or build_datasets(cfg, progress, manifest=manifest)
    train_loader = DataLoader(data["train"], batch_size=t["batch_size"], shuffle=True, drop_last=True,
                              num_workers=t["num_workers"], persistent_workers=False)
    val_loader = DataLoader(data["val"], batch_size=64, shuffle=False, num_workers=t["num_workers"])
    module = ClassifierModule(cfg)
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_auc", mode="max",
                           save_last=True, save_top_k=1)
    callbacks = [best, EarlyStopping(monitor="val_auc", mode="max", patience=t["patience"])]
    if progress:
        callbacks.append(_progress_bar())
    trainer = L.Trainer(max_epochs=t["epochs"], accelerator="auto", devices=1, callbacks=callbacks,
                        logger=CSVLogger(run_dir, name="logs"), deterministic=False,
                        enable_progress_bar=progress, log_every_n_steps=5, num_sanity_val_steps=0,
                        enable_model_summary=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    started = time.time()
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last.exists() else None)
    seconds = time.time() - started
    epochs_run = max(1, trainer.current_epoch)

    best_path = best.best_model_path or str(last)
    state = torch.load(best_path, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    module.eval()
    val_metrics = _validation_summary(module, val_loader, cfg.get("evaluate", {}))
    bundle = make_bundle(module.model, cfg, data_fingerprint=data["fingerprint"],
                         validation=val_metrics, best_epoch=_best_epoch(state), seconds_per_epoch=seconds / epochs_run)
    return _write_bundle(bundle, val_metrics, run_dir)


def _fit_ensemble(cfg: dict, run_dir: Path, progress: bool, manifest=None) -> Path:
    t = cfg["train"]
    member_cfgs = [copy.deepcopy(cfg) for _ in range(int(t["ensemble"]))]
    for k, member_cfg in enumerate(member_cfgs):
        member_cfg["train"].update(ensemble=1, seed=int(t["seed"]) + k)
    # Every folder is checked before any is recorded, so a refused run changes nothing.
    fingerprint = split_manifests(cfg, manifest)[1]
    runfolder.check(run_dir, cfg, fingerprint)
    for k, member_cfg in enumerate(member_cfgs):
        runfolder.check(run_dir / f"member_{k}", member_cfg, split_manifests(member_cfg, manifest)[1])
    runfolder.claim(run_dir, cfg, fingerprint)
    members, summaries, data = [], [], None
    for k, member_cfg in enumerate(member_cfgs):
        member_dir = run_dir / f"member_{k}"
        path = member_dir / "model.pt"
        if not runfolder.finished(member_dir, member_cfg):  # finished members are kept
            data = build_datasets(member_cfg, progress, manifest=manifest)
            path = fit(member_cfg, member_dir, progress, datasets=data)
        model, bundle = load_bundle(path)
        members.append(model)
        summaries.append(bundle)
    cfg["preprocess"] = summaries[0]["preprocess"]
    data = data or build_datasets(copy.deepcopy(cfg), progress, manifest=manifest)
    ensemble = Ensemble(members).eval()
    val_loader = DataLoader(data["val"], batch_size=64, shuffle=False, num_workers=t["num_workers"])
    val_metrics = _validation_summary(ensemble, val_loader, cfg.get("evaluate", {}))
    bundle = make_bundle(ensemble, cfg, data_fingerprint=data["fingerprint"], validation=val_metrics,
                         best_epoch=[s.get("best_epoch") for s in summaries],
                         seconds_per_epoch=float(np.mean([s["seconds_per_epoch"] for s in summaries])),
                         members=[{"seed": s["config"]["train"]["seed"], "validation": s["validation"]}
                                  for s in summaries])
    return _write_bundle(bundle, val_metrics, run_dir)


def _write_bundle(bundle: dict, val_metrics: dict, run_dir: Path) -> Path:
    """`model.pt` with the validation (Youden) threshold, and its summary without the weights."""
    bundle["threshold"] = val_metrics.get("youden_threshold", 0.5)
    path = save_bundle(bundle, run_dir / "model.pt")
    write_json_atomic(run_dir / "train_summary.json", {k: v for k, v in bundle.items() if k != "state_dict"})
    return path


def _best_epoch(state) -> int | None:
    return state.get("epoch")


@torch.no_grad()
def _validation_summary(module, loader, evaluate: dict) -> dict:
    """Validation AUC and accuracy with the test-time views the bundle records (none unless the config asks);
    Youden threshold for binary models."""
    probs, targets = [], []
    for batch in loader:
        views = tta_views(batch["image"], bool(evaluate.get("tta", False)), evaluate.get("tta_scales", [1.0]))
        probs.append(torch.stack([class_probabilities(module(v)["logits"]) for v in views]).mean(0))
        targets.append(batch["target"])
    p, y = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    summary = {"auc": macro_auc(y, p), "accuracy": float((predicted_class(p) == y).mean())}
    if p.ndim == 1:
        summary["youden_threshold"] = youden_threshold(y, p)
    return summary


def _progress_bar():
    try:
        return RichProgressBar(leave=True)
    except Exception:  # rich missing in a minimal install
        return TQDMProgressBar()
