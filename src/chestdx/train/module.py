"""The LightningModule every method trains in: the model's heads and its registered method.

The method (`chestdx.train.methods`) owns the training step and the parameter groups; the
primary head's task owns the validation score checkpoints are selected on (`val_auc`: AUC, or
the macro AUC of a multi-class or multi-label head). Nothing here depends on which model it is.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning

from chestdx.errors import ChestDxError
from chestdx.models import get_entry
from chestdx.models.backbones import freeze_stages
from chestdx.models.bundle import model_kwargs
from chestdx.tasks import head_by_name
from chestdx.train.methods import get_method


class ChestDxModule(L.LightningModule):
    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        m = config["model"]
        self.entry = get_entry(m["name"])
        self.heads = list(self.entry.heads)
        self.primary = self.entry.primary_head
        # The head whose validation score picks the best epoch (a stage of AG-CNN: its branch).
        self.monitor = head_by_name(self.heads, config["train"].get("monitor") or self.primary.name)
        self.model = self.entry.build(pretrained=m.get("pretrained"), **model_kwargs(m))
        if hasattr(self.model, "check_preprocess"):  # a model built on another's features (a stage-1 bundle)
            self.model.check_preprocess(config["preprocess"])
        stages = int(config["train"].get("freeze_stages") or 0)
        if stages:
            backbone = getattr(self.model, "backbone", None)
            if backbone is None:
                raise ChestDxError(f"train.freeze_stages: model {m['name']!r} has no timm backbone to freeze")
            freeze_stages(backbone, stages)
        # oneDNN 2D convolutions run ~2x faster on CPU in NHWC; volumes keep the default layout.
        self.channels_last = bool(config["train"].get("channels_last", True)) and self.entry.spatial_dims == 2
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.method = get_method(self.entry.method)(self.heads, config["train"], config.get("method"),
                                                    seed=int(config["train"]["seed"]))
        self._val = []

    def forward(self, x):
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def on_train_epoch_start(self):
        loader = self.trainer.train_dataloader
        if loader is not None and hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(self.current_epoch)

    def training_step(self, batch, _):
        losses = self.method.losses(self.model, batch, None)
        n = len(batch["index"])
        for key, value in losses.items():
            self.log(f"train_{key}", value, prog_bar=key == "loss", on_step=False, on_epoch=True, batch_size=n,
                     sync_dist=True)
        return losses["loss"]

    def validation_step(self, batch, _):
        out = self.model(batch["image"])
        self._val.append({h.name: (h.kind.probabilities(out[h.output]).float(), batch["targets"][h.name],
                                   batch["known"][h.name]) for h in self.heads})

    def on_validation_epoch_end(self):
        if not self._val:
            return
        steps, self._val = self._val, []
        for head in self.heads:
            probs, targets, known = (torch.cat([step[head.name][i] for step in steps]) for i in range(3))
            if self.trainer.world_size > 1:  # every rank scores the whole validation set
                probs, targets, known = (self.all_gather(t).flatten(0, 1) for t in (probs, targets, known))
            p, y, k = probs.cpu().numpy(), targets.cpu().numpy(), known.cpu().numpy()
            score = head.score(y, p, k)
            if len(self.heads) > 1:
                self.log(f"val_auc_{head.name}", score)
            if head is self.monitor:
                self.log("val_auc", score, prog_bar=True)
                if head.task != "multilabel":
                    self.log("val_acc", float((head.kind.decide(p, [0.5]) == y).mean()), prog_bar=True)

    def configure_optimizers(self):
        t = self.config["train"]
        groups = self.method.parameter_groups(self.model, t)
        if t.get("optimizer", "adamw") == "sgd":  # MAG-SD's paper setting: SGD, momentum 0.9
            opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=t["weight_decay"])
        elif t.get("optimizer") == "adam":  # DSAN's: Adam with L2 weight decay
            opt = torch.optim.Adam(groups, weight_decay=t["weight_decay"])
        else:
            opt = torch.optim.AdamW(groups, weight_decay=t["weight_decay"])
        if t.get("schedule", "cosine") == "step":  # DSAN's: lr / 10 every 5 epochs
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(t.get("lr_step_epochs", 5)),
                                                    gamma=float(t.get("lr_step_gamma", 0.1)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = min(total - 1, int(t.get("warmup_epochs", 1) * total / max(1, t["epochs"])))

        def schedule(step):  # linear warm-up, then cosine to zero
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FreezeModules(BaseFinetuning):
    """A stage's `freeze:` list: the model's modules whose names start with one of the prefixes
    get no gradient and stay in eval mode (batch-norm statistics and dropout fixed too), so their
    weights leave the stage bit-identical."""

    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = [p.rstrip(".") for p in prefixes]

    def modules(self, pl_module) -> list:
        named = dict(pl_module.model.named_modules())
        missing = [p for p in self.prefixes if p not in named]
        if missing:
            raise ChestDxError(f"freeze: the model has no module {', '.join(map(repr, missing))}")
        return [named[p] for p in self.prefixes]

    def freeze_before_training(self, pl_module):
        self.frozen = self.modules(pl_module)  # looked up once, not on every batch
        self.freeze(self.frozen, train_bn=False)  # BN affine weights frozen too

    def finetune_function(self, pl_module, epoch, optimizer):
        pass  # nothing is unfrozen during a stage

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for mod in self.frozen:
            mod.eval()
