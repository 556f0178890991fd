"""The LightningModule shared by the 2D classifiers: loss, optimiser, schedule, validation AUC."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from chestdx.models import create_model, ladnn_loss


class ClassifierModule(L.LightningModule):
    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        m = config["model"]
        self.model = create_model(m["name"], backbone=m["backbone"], pretrained=m.get("pretrained"),
                                  dropout=m.get("dropout", 0.2), drop_path=m.get("drop_path", 0.0))
        self._val = []

    def forward(self, x):
        return self.model(x)

    def on_train_epoch_start(self):
        loader = self.trainer.train_dataloader
        if loader is not None and hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(self.current_epoch)

    def training_step(self, batch, _):
        t = self.config["train"]
        losses = ladnn_loss(self.model(batch["image"]), batch["target"], batch["lesions"], batch["lesion_mask"],
                            lesion_weight=t["lesion_weight"], label_smoothing=t.get("label_smoothing", 0.0))
        self.log("train_loss", losses["loss"], prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=len(batch["target"]))
        if "loss_a" in losses:
            self.log("train_loss_lesion", losses["loss_a"], on_step=False, on_epoch=True,
                     batch_size=len(batch["target"]))
        return losses["loss"]

    def validation_step(self, batch, _):
        out = self.model(batch["image"])
        self._val.append((torch.sigmoid(out["logits"]).float().cpu(), batch["target"].cpu()))

    def on_validation_epoch_end(self):
        if not self._val:
            return
        probs = torch.cat([p for p, _ in self._val]).numpy()
        targets = torch.cat([t for _, t in self._val]).numpy()
        self._val.clear()
        auc = roc_auc_score(targets, probs) if len(np.unique(targets)) == 2 else 0.5
        acc = float(((probs >= 0.5) == targets).mean())
        self.log("val_auc", float(auc), prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)

    def configure_optimizers(self):
        t = self.config["train"]
        backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.")]
        heads = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
        opt = torch.optim.AdamW([{"params": backbone, "lr": t["lr"]}, {"params": heads, "lr": t["lr"] * 10}],
                                weight_decay=t["weight_decay"])
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = min(total - 1, int(t.get("warmup_epochs", 1) * total / max(1, t["epochs"])))

        def schedule(step):  # linear warm-up, then cosine to zero
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
