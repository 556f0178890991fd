"""Train one experiment: data, Lightning Trainer, best-on-validation checkpoint, model bundle.

A run folder holds Lightning's checkpoints (`last.ckpt` every epoch, `best.ckpt` on the
validation score), CSV logs (a new `logs/version_N` per invocation, so a resumed run keeps the
earlier epochs' log) and the final `model.pt` bundle. Re-running the same command after a kill
resumes from `last.ckpt`. A config with `stages:` trains them one after the other
(`chestdx.train.stages`); `train.ensemble: K` trains K seed members (`_fit_ensemble`).

The `trainer:` section goes to Lightning as it is, with `auto` resolved here: every GPU present
with DDP and bf16 mixed precision where the GPU has it, one CPU process otherwise.
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

from chestdx.data.dataset import ManifestDataset, reader_for
from chestdx.data.datasets import get_dataset
from chestdx.data.transforms import build_pipeline, tta_views
from chestdx.errors import ChestDxError
from chestdx.evaluate.calibration import apply_temperature, calibration_summary, fit_temperature
from chestdx.models import get_entry
from chestdx.models.backbones import input_normalisation
from chestdx.models.bundle import load_bundle, make_bundle, save_bundle
from chestdx.models.ensemble import ensemble_class
from chestdx.train import runfolder
from chestdx.train.memory import keep_freed_memory
from chestdx.train.methods import get_method
from chestdx.train.module import ChestDxModule, FreezeModules
from chestdx.utils import write_json_atomic


def prepare_config(cfg: dict) -> dict:
    """Fill in the backbone's input normalisation (idempotent), so every record of the config agrees;
    a model without a pretrained backbone gets mean 0.5, std 0.5."""
    cfg["preprocess"] = {**input_normalisation(cfg["model"]), **cfg["preprocess"]}
    return cfg


def trainer_settings(section: dict | None) -> dict:
    """The `trainer:` section with `auto` resolved to what this machine has."""
    t = {"accelerator": "auto", "devices": "auto", "num_nodes": 1, "strategy": "auto", "precision": "auto",
         **(section or {})}
    gpus = torch.cuda.device_count()
    accelerator = t["accelerator"] if t["accelerator"] != "auto" else ("gpu" if gpus else "cpu")
    devices = t["devices"]
    if devices == "auto":
        devices = max(1, gpus) if accelerator in ("gpu", "cuda") else 1
    n = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    strategy = t["strategy"]
    if strategy == "auto" and n * int(t["num_nodes"]) > 1:
        strategy = "ddp"
    precision = t["precision"]
    if precision == "auto":
        bf16 = accelerator in ("gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 else "32-true"
    return {"accelerator": accelerator, "devices": devices, "num_nodes": int(t["num_nodes"]), "strategy": strategy,
            "precision": str(precision)}


def quiet_lightning() -> None:
    """Keep Lightning's banner lines, product tips and its own internal deprecation notice out of a
    user's terminal; warnings about the run itself still show."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A run folder is resumed on purpose (chestdx.train.runfolder checked its settings).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Frozen modules (a stage's `freeze:`, the sequence model's extractor) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


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
    if len(subsets["train"]) < int(cfg["train"]["batch_size"]):
        raise ChestDxError(f"{len(subsets['train'])} training images, fewer than train.batch_size "
                           f"({cfg['train']['batch_size']}): no full training batch")
    return subsets, f"{subsets['train'].fingerprint()}-{subsets['val'].fingerprint()}"


def make_dataset(cfg: dict, manifest, train: bool, progress: bool = False, seed: int | None = None) -> ManifestDataset:
    """A dataset of `manifest` for the config's model: its heads, sample kind and preprocessing."""
    entry = get_entry(cfg["model"]["name"])
    pre = prepare_config(cfg)["preprocess"]
    load, sample = build_pipeline(pre, train=train, aug=cfg["augment"] if train else None,
                                  spatial_dims=entry.spatial_dims)
    data = cfg.get("data") or {}
    return ManifestDataset(manifest, entry.heads, load, sample, seed=cfg["train"]["seed"] if seed is None else seed,
                           progress=progress, cache=data.get("cache", "memory"), cache_dir=data.get("cache_dir"),
                           settings={"preprocess": pre, "sample": entry.sample}, read=reader_for(entry.sample, pre))


def build_datasets(cfg: dict, progress: bool = True, manifest=None) -> dict:
    """Train and val datasets of the config's named dataset, or of `manifest` (e.g. one CV fold)."""
    subsets, fingerprint = split_manifests(cfg, manifest)
    out = {"fingerprint": fingerprint}
    for split, sub in subsets.items():
        out[split] = make_dataset(cfg, sub, train=split == "train", progress=progress)
    return out


def fit(cfg: dict, run_dir, progress: bool = True, datasets: dict | None = None, manifest=None,
        init_from=None, freeze=()) -> Path:
    """Train (or resume) and write `<run_dir>/model.pt`; returns its path (on DDP ranks > 0 too, which
    train but do not write it).

    `manifest` replaces the config's dataset splits (e.g. one cross-validation fold); `datasets`
    passes ready-built ones (single models only); `init_from` is a bundle whose weights start the
    run and `freeze` the module prefixes kept fixed (one stage of a multi-stage config).
    `train.ensemble: K` (> 1) trains K members from seeds seed, seed+1, ... in
    `<run_dir>/member_<k>` and bundles them as one seed ensemble (models/ensemble.py)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    prepare_config(cfg)
    if cfg.get("stages"):
        from chestdx.train.stages import fit_stages

        return fit_stages(cfg, run_dir, progress, manifest)
    if int(cfg["train"].get("ensemble") or 1) > 1:
        if datasets is not None:  # each member builds its own, seeded by its seed
            raise ValueError("fit(datasets=...) is for single models; pass manifest= for an ensemble")
        return _fit_ensemble(cfg, run_dir, progress, manifest)
    t = cfg["train"]
    fingerprint = run_fingerprint(cfg, manifest, init_from, freeze, datasets)
    runfolder.claim(run_dir, cfg, fingerprint)  # before any image is read
    L.seed_everything(t["seed"], workers=True, verbose=False)
    data = datasets or build_datasets(cfg, progress, manifest=manifest)
    module = ChestDxModule(cfg)
    module.method.fit_to(data["train"])
    if init_from is not None:
        _, previous = load_bundle(init_from)
        module.model.load_state_dict(previous["state_dict"])
    generator = torch.Generator().manual_seed(int(t["seed"]))
    sampler = module.method.sampler(data["train"], t, generator)
    train_loader = DataLoader(data["train"], batch_size=t["batch_size"], shuffle=sampler is None, sampler=sampler,
                              drop_last=True, num_workers=t["num_workers"], persistent_workers=False)
    val_loader = DataLoader(data["val"], batch_size=64, shuffle=False, num_workers=t["num_workers"])
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_auc", mode="max",
                           save_last=True, save_top_k=1)
    callbacks = [best, EarlyStopping(monitor="val_auc", mode="max", patience=t["patience"])]
    if freeze:
        callbacks.append(FreezeModules(freeze))
    if progress:
        callbacks.append(_progress_bar())
    quiet_lightning()
    trainer = L.Trainer(max_epochs=t["epochs"], callbacks=callbacks, **trainer_settings(cfg.get("trainer")),
                        logger=CSVLogger(run_dir, name="logs"), deterministic=False,
                        enable_progress_bar=progress, log_every_n_steps=max(1, min(5, len(train_loader))),
                        num_sanity_val_steps=0, enable_model_summary=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    started = time.time()
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last.exists() else None)
    if trainer.global_rank == 0:  # rank 0 writes the bundle
        seconds = time.time() - started
        epochs_run = max(1, trainer.current_epoch)
        # A run resumed after its last epoch validates nothing, so this session's callback knows no
        # best: the one an earlier session kept is on disk.
        kept = run_dir / "checkpoints" / "best.ckpt"
        best_path = best.best_model_path or (str(kept) if kept.exists() else str(last))
        state = torch.load(best_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        module.eval()
        val_metrics = validation_summary(module.model, module.heads, val_loader, cfg.get("evaluate", {}),
                                         module.monitor.name)
        bundle = make_bundle(module.model, cfg, data_fingerprint=data["fingerprint"], validation=val_metrics,
                             best_epoch=_best_epoch(state), seconds_per_epoch=seconds / epochs_run)
        write_bundle(bundle, val_metrics, run_dir, data["train"])
    # Every DDP rank waits for the bundle, then goes on together (the next ensemble member, stage or fold:
    # a later Trainer in these processes joins the same process group).
    trainer.strategy.barrier()
    return run_dir / "model.pt"


def is_main_process() -> bool:
    """False in the DDP worker processes (rank > 0), which train but write and report nothing."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def run_fingerprint(cfg: dict, manifest=None, init_from=None, freeze=(), datasets: dict | None = None) -> str:
    """What a run folder records as its data: the train/val manifests, and for a stage the folder of
    the stage it starts from and its frozen modules."""
    fingerprint = datasets["fingerprint"] if datasets is not None else split_manifests(cfg, manifest)[1]
    if init_from is not None or freeze:
        fingerprint += f"|init={Path(init_from).parent.name if init_from else None}|freeze={sorted(freeze)}"
    return fingerprint


def _fit_ensemble(cfg: dict, run_dir: Path, progress: bool, manifest=None) -> Path:
    t = cfg["train"]
    method = get_method(get_entry(cfg["model"]["name"]).method)
    member_cfgs = [copy.deepcopy(cfg) for _ in range(int(t["ensemble"]))]
    for k, member_cfg in enumerate(member_cfgs):
        method.member_config(member_cfg, k)  # before ensemble=1: it may check the ensemble size
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
    if not is_main_process():
        return run_dir / "model.pt"
    cfg["preprocess"] = summaries[0]["preprocess"]
    data = data or build_datasets(copy.deepcopy(cfg), progress, manifest=manifest)
    entry = get_entry(cfg["model"]["name"])
    ensemble = ensemble_class(method.ensemble_rule(cfg))(members, entry.heads).eval()
    val_loader = DataLoader(data["val"], batch_size=64, shuffle=False, num_workers=t["num_workers"])
    val_metrics = validation_summary(ensemble, entry.heads, val_loader, cfg.get("evaluate", {}), entry.primary)
    bundle = make_bundle(ensemble, cfg, data_fingerprint=data["fingerprint"], validation=val_metrics,
                         best_epoch=[s.get("best_epoch") for s in summaries],
                         seconds_per_epoch=float(np.mean([s["seconds_per_epoch"] for s in summaries])),
                         members=[{"seed": s["config"]["train"]["seed"], "validation": s["validation"]}
                                  for s in summaries])
    return write_bundle(bundle, val_metrics, run_dir, data["train"])


MIN_REFERENCE_IMAGES = 200  # fewer training images give a reference that refuses good images at random


def write_bundle(bundle: dict, val_metrics: dict, run_dir: Path, train_set=None) -> Path:
    """`model.pt` with the operating thresholds chosen on validation (Youden's J per binary or
    multi-label head), the input reference of its training images (what `check_input` compares a
    new image with before it gets a probability), and its summary without the weights."""
    bundle["thresholds"] = val_metrics.get("thresholds", {})
    if "calibration" in val_metrics:
        bundle["calibration"] = val_metrics["calibration"]
    manifest = getattr(train_set, "manifest", None)
    if bundle.get("sample", "image") == "image" and manifest is not None and len(manifest) >= MIN_REFERENCE_IMAGES:
        from chestdx.data.input_check import REFERENCE_KEY, fit_manifest_reference

        bundle[REFERENCE_KEY] = fit_manifest_reference(manifest, modality=bundle.get("modality"), split=None,
                                                       max_images=2000,
                                                       hu_window=bundle["preprocess"].get("hu_window"))
    path = save_bundle(bundle, run_dir / "model.pt")
    write_json_atomic(run_dir / "train_summary.json", {k: v for k, v in bundle.items() if k != "state_dict"})
    return path


def _best_epoch(state) -> int | None:
    return state.get("epoch")


@torch.no_grad()
def validation_summary(model, heads, loader, evaluate: dict, primary: str) -> dict:
    """The `primary` head's validation score and accuracy with the test-time views the bundle records
    (none unless the config asks), every head's score, and each head's operating thresholds chosen on
    validation."""
    heads = list(heads)
    probs = {h.name: [] for h in heads}
    for batch in loader:
        views = tta_views(batch["image"], bool(evaluate.get("tta", False)), evaluate.get("tta_scales", [1.0]))
        outs = [model(v) for v in views]
        for h in heads:
            probs[h.name].append(torch.stack([h.kind.probabilities(o[h.output]) for o in outs]).mean(0))
    data = loader.dataset
    thresholds, summary, by_head, calibration = {}, {}, {}, None
    for h in heads:
        p = torch.cat(probs[h.name]).numpy()
        y, known = data.head_arrays(h.name)
        if h.name == primary and h.task != "multilabel":
            # Temperature scaling of the primary head on validation; thresholds are then chosen on
            # the calibrated probabilities, the ones a user sees (T is monotone: AUC unchanged).
            calibration = fit_calibration(y, p, known)
            p = apply_temperature(p, calibration["temperature"])
        if h.task != "multiclass":
            thresholds[h.name] = h.kind.choose_thresholds(y, p, known)
        by_head[h.name] = h.score(y, p, known)
        if h.name == primary:
            summary = {"auc": by_head[h.name], "head": h.name}
            if h.task != "multilabel":
                summary["accuracy"] = float((h.kind.decide(p, [0.5]) == y).mean())
    if len(heads) > 1:
        summary["auc_by_head"] = by_head
    summary["thresholds"] = thresholds
    if calibration is not None:
        summary["calibration"] = {"head": primary, **calibration}
    return summary


def fit_calibration(y, prob, known=None) -> dict:
    """The validation temperature with ECE, Brier score and NLL before and after it."""
    rows = np.ones(len(y), bool) if known is None else np.asarray(known).reshape(len(y), -1).all(1) > 0
    y, prob = np.asarray(y)[rows], np.asarray(prob)[rows]
    temperature = fit_temperature(y, prob)
    return {"temperature": temperature, "fitted_on": "validation",
            "validation_before": calibration_summary(y, prob),
            "validation_after": calibration_summary(y, apply_temperature(prob, temperature))}


def _progress_bar():
    try:
        return RichProgressBar(leave=True)
    except Exception:  # rich missing in a minimal install
        return TQDMProgressBar()
