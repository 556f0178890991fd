"""The LightningModule shared by the 2D classifiers: loss, optimiser, schedule, validation AUC.

Binary models (one logit, e.g. LA-DNN) train on `ladnn_loss`; multi-class models on cross
entropy; MAG-SD on its own step (Sec. III-C/D): a raw pass, the attention guided augmentations
made from that pass's detached attention maps, one pass per augmented batch, and the soft
distance (or L2) regularization over all of them.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from chestdx.errors import ChestDxError
from chestdx.models import create_model, get_entry, ladnn_loss
from chestdx.models.backbones import freeze_stages
from chestdx.models.bundle import model_kwargs
from chestdx.models.ladnn import negatives_lesion_free
from chestdx.models.magsd import soft_distance_loss
from chestdx.models.magsd_augment import AUGMENTATIONS, augment

MAGSD_DEFAULTS = {"augmentations": list(AUGMENTATIONS), "regularization": "soft", "augment_per_step": 0,
                  "confidence": 0.7, "smoothing": 0.1}


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid of a single logit per image (binary models), softmax otherwise."""
    return torch.sigmoid(logits) if logits.ndim == 1 else torch.softmax(logits, dim=1)


def macro_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC, or the macro one-vs-rest AUC; 0.5 when a class is missing from the targets."""
    n_classes = 2 if probs.ndim == 1 else probs.shape[1]
    if len(np.unique(targets)) < n_classes:
        return 0.5
    if probs.ndim == 1:
        return float(roc_auc_score(targets, probs))
    return float(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))


def predicted_class(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return (probs >= threshold).astype(int) if probs.ndim == 1 else probs.argmax(1)


class ClassifierModule(L.LightningModule):
    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        m = config["model"]
        self.classes = get_entry(m["name"]).classes
        self.model = create_model(m["name"], pretrained=m.get("pretrained"), **model_kwargs(m))
        stages = int(config["train"].get("freeze_stages") or 0)
        if stages:
            backbone = getattr(self.model, "backbone", None)
            if backbone is None:
                raise ChestDxError(f"train.freeze_stages: model {m['name']!r} has no timm backbone to freeze")
            freeze_stages(backbone, stages)
        if config["train"].get("channels_last", True):  # oneDNN convolutions run ~2x faster on CPU in NHWC
            self.model = self.model.to(memory_format=torch.channels_last)
        self.magsd = {**MAGSD_DEFAULTS, **config.get("magsd", {})} if m["name"] == "magsd" else None
        self._rng = np.random.default_rng(config["train"]["seed"])
        self._val = []

    def forward(self, x):
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.config["train"].get("channels_last", True) and batch["image"].ndim == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def on_train_epoch_start(self):
        loader = self.trainer.train_dataloader
        if loader is not None and hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(self.current_epoch)

    def training_step(self, batch, _):
        t = self.config["train"]
        x, y = batch["image"], batch["target"]
        if self.magsd is not None:
            losses = self._magsd_losses(x, y)
        elif len(self.classes) > 2:
            ce = F.cross_entropy(self.model(x)["logits"], y, label_smoothing=t.get("label_smoothing", 0.0))
            losses = {"loss": ce}
        else:
            lesions, known = batch["lesions"], batch["lesion_mask"]
            if t.get("negatives_lesion_free"):
                lesions, known = negatives_lesion_free(y, lesions, known)
            losses = ladnn_loss(self.model(x), y, lesions, known, lesion_weight=t["lesion_weight"],
                                label_smoothing=t.get("label_smoothing", 0.0))
        for key, value in losses.items():
            name = {"loss": "train_loss", "loss_a": "train_loss_lesion"}.get(key, f"train_{key}")
            self.log(name, value, prog_bar=key == "loss", on_step=False, on_epoch=True, batch_size=len(y))
        return losses["loss"]

    def _magsd_losses(self, x, y) -> dict:
        cfg = self.magsd
        raw = self.model(x)
        which = [a for a in AUGMENTATIONS if a in cfg["augmentations"]]
        per_step = int(cfg["augment_per_step"] or 0)
        if 0 < per_step < len(which):  # a CPU budget: a random subset of the augmentations each step
            which = list(self._rng.choice(which, size=per_step, replace=False))
        augmented = augment(x, raw["attention"], which)
        aug_logits = [self.model(images)["logits"] for images in augmented.values()]
        if cfg["regularization"] == "none":  # augmentations as plain extra training data
            ce = F.cross_entropy(raw["logits"], y)
            extra = sum((F.cross_entropy(lg, y) for lg in aug_logits), ce.new_zeros(()))
            return {"loss": ce + extra, "loss_ce": ce}
        out = soft_distance_loss(raw["logits"], aug_logits, y, mode=cfg["regularization"],
                                 confidence=cfg["confidence"], smoothing=cfg["smoothing"])
        return {"loss": out["loss"], "loss_ce": out["loss_ce"], "loss_reg": out["loss_reg"], "trusted": out["trusted"]}

    def validation_step(self, batch, _):
        out = self.model(batch["image"])
        self._val.append((class_probabilities(out["logits"]).float().cpu(), batch["target"].cpu()))

    def on_validation_epoch_end(self):
        if not self._val:
            return
        probs = torch.cat([p for p, _ in self._val]).numpy()
        targets = torch.cat([t for _, t in self._val]).numpy()
        self._val.clear()
        self.log("val_auc", macro_auc(targets, probs), prog_bar=True)
        self.log("val_acc", float((predicted_class(probs) == targets).mean()), prog_bar=True)

    def configure_optimizers(self):
        t = self.config["train"]
        backbone = [p for n, p in self.model.named_parameters() if n.startswith(("backbone.", "encoder."))]
        heads = [p for n, p in self.model.named_parameters() if not n.startswith(("backbone.", "encoder."))]
        groups = [{"params": backbone, "lr": t["lr"]}, {"params": heads, "lr": t["lr"] * t.get("head_lr_factor", 10)}]
        if t.get("optimizer", "adamw") == "sgd":  # MAG-SD's paper setting: SGD, momentum 0.9
            opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=t["weight_decay"])
        else:
            opt = torch.optim.AdamW(groups, weight_decay=t["weight_decay"])
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = min(total - 1, int(t.get("warmup_epochs", 1) * total / max(1, t["epochs"])))

        def schedule(step):  # linear warm-up, then cosine to zero
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
