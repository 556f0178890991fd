"""Training methods: one registered method per paper owns its training step, its parameter groups
and its sampler, so the Lightning module never asks which model it trains.

A method is a class with `options` (its config section `method:`, with defaults) and
- `losses(model, batch, rng) -> dict` with at least `loss` (the other entries are logged);
- `parameter_groups(model, train_cfg) -> list[dict]` for the optimiser;
- `sampler(dataset, train_cfg, generator) -> Sampler | None` (None: shuffle uniformly);
- `fit_to(dataset)`: called once with the training set before training (the class weights of
  `train.class_weights: balanced` are counted there);
- `member_config(cfg, k)` and `ensemble_rule(cfg)` for `train.ensemble: K`: member k's config (the
  seed is set already) and the rule that combines the members (`models.ensemble.ENSEMBLE_RULES`).

`SupervisedMethod` is the default: the weighted sum over the model's heads of each head's task
loss (`chestdx.tasks`), weights from `train.head_weights` (1 for a head not named there). The
papers' own steps subclass it beside their models (`LADNNMethod` in models/ladnn.py,
`MAGSDMethod` in models/magsd.py).
"""

from __future__ import annotations

from chestdx.errors import ChestDxError
from chestdx.tasks import Head, balanced_class_weights

_METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    if name not in _METHODS:
        raise ChestDxError(f"unknown training method {name!r}; registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


class SupervisedMethod:
    name = "supervised"
    options: dict = {}
    # Parameters whose names start with these are the pretrained feature extractor (train.lr);
    # the rest are new heads (train.lr * train.head_lr_factor).
    backbone_prefixes = ("backbone.", "encoder.")

    def __init__(self, heads: list[Head], train_cfg: dict, options: dict | None = None, seed: int = 0):
        self.heads = list(heads)
        self.train_cfg = train_cfg
        self.opts = {**self.options, **(options or {})}
        unknown = sorted(set(train_cfg.get("head_weights") or {}) - {h.name for h in self.heads})
        if unknown:
            raise ChestDxError(f"train.head_weights names {unknown}, which the model does not have; "
                               f"its heads: {', '.join(h.name for h in self.heads)}")
        self.weights = {h.name: float((train_cfg.get("head_weights") or {}).get(h.name, 1.0)) for h in self.heads}
        self.class_weights: dict = {}  # head -> per-class loss weights (train.class_weights)

    def fit_to(self, dataset) -> None:
        if self.train_cfg.get("class_weights", "none") != "balanced":
            return
        for head in self.heads:
            if head.task == "multilabel":
                raise ChestDxError(f"train.class_weights: balanced is for binary and multi-class heads; "
                                   f"head {head.name!r} is multi-label")
            values, known = dataset.head_arrays(head.name)
            self.class_weights[head.name] = balanced_class_weights(values, known, len(head.labels))

    def head_losses(self, out: dict, batch: dict) -> dict:
        smoothing = float(self.train_cfg.get("label_smoothing", 0.0))
        losses = {}
        for head in self.heads:
            if not self.weights[head.name]:
                continue
            # Smoothing is for the diagnosis; auxiliary multi-label heads learn hard labels (LA-DNN L_A).
            ls = smoothing if head.task != "multilabel" else 0.0
            losses[head.name] = head.kind.loss(out[head.output], batch["targets"][head.name],
                                               batch["known"][head.name], label_smoothing=ls,
                                               class_weights=self.class_weights.get(head.name))
        return losses

    def total(self, losses: dict) -> dict:
        names = [h.name for h in self.heads if h.name in losses]
        loss = None
        for name in names:
            term = losses[name] if self.weights[name] == 1.0 and loss is None else self.weights[name] * losses[name]
            loss = term if loss is None else loss + term
        return {"loss": loss, **{f"loss_{n}": losses[n] for n in names}}

    def losses(self, model, batch: dict, rng) -> dict:
        return self.total(self.head_losses(model(batch["image"]), batch))

    def parameter_groups(self, model, train_cfg: dict) -> list[dict]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        backbone = [p for n, p in named if n.startswith(self.backbone_prefixes)]
        heads = [p for n, p in named if not n.startswith(self.backbone_prefixes)]
        lr = float(train_cfg["lr"])
        groups = [{"params": backbone, "lr": lr}, {"params": heads, "lr": lr * float(train_cfg.get("head_lr_factor", 10))}]
        return [g for g in groups if g["params"]]

    def sampler(self, dataset, train_cfg: dict, generator):
        return None

    # A `train.ensemble: K` run: each member's config (beyond its seed), and how members combine.
    @classmethod
    def member_config(cls, cfg: dict, k: int) -> dict:
        return cfg

    @classmethod
    def ensemble_rule(cls, cfg: dict) -> str:
        return "mean"


register_method(SupervisedMethod)
