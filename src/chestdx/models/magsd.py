"""MAG-SD: multiscale attention guided network with soft-distance regularization (Li et al., JBHI 2021).

- MA-Net (Sec. III-B, Fig. 2-4): a timm backbone with `features_only` gives f1, f2, f3 (the last
  three stages). The multiscale attention generator (Fig. 3) turns each chosen stage into
  M = 32 maps with a 1x1 convolution, resizes them to the f3 grid and adds them (residual
  sum): `scales` picks 7, 7+14 or 7+14+28 (Table V). Attention pooling (Fig. 4, Eq. 1):
  PF_j = A_j * f3, each averaged over positions and concatenated, then signed square root and
  L2 normalisation as in WS-DAN; GAP or GMP of f3 are the alternatives of Table VI.
- Attention guided augmentation (Sec. III-C, Eq. 2-4) is in `magsd_augment.py`.
- Soft distance regularization (Sec. III-D, Eq. 5-7, Algorithm 1) is `soft_distance_loss` here,
  with the L2 alternative of Table VIII.

Departures from the official code, on purpose: all three scales are available (it used two),
the pretrained stem is kept, and the whole image is z-scored (see the data layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chestdx.models.backbones import create_backbone
from chestdx.models.magsd_augment import AUGMENTATIONS, augment
from chestdx.models.registry import ModelEntry, register
from chestdx.tasks import Head
from chestdx.train.methods import SupervisedMethod, register_method

CXR_CLASSES = ("normal", "pneumonia", "covid")
CXR_DIAGNOSIS = Head("diagnosis", "multiclass", CXR_CLASSES, output="logits")
CXR_PREPROCESS = {"channels": 1, "resize": "pad", "clahe": True, "zscore": True}

SCALE_LEVELS = {7: -1, 14: -2, 28: -3}  # attention grid at 224 px -> backbone stage (stride 32, 16, 8)
POOLINGS = ("attention", "gap", "gmp")
WSDAN_SCALE = 100.0  # WS-DAN scales the L2-normalised feature matrix before the classifier


class MultiscaleAttention(nn.Module):
    """Fig. 3: per chosen stage a 1x1 conv (+BN, ReLU) to M maps, resized to f3's grid, summed."""

    def __init__(self, channels: list[int], n_maps: int = 32):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, n_maps, 1, bias=False), nn.BatchNorm2d(n_maps), nn.ReLU(inplace=True))
            for c in channels)

    def forward(self, features: list[torch.Tensor], size) -> torch.Tensor:
        return sum(F.adaptive_avg_pool2d(branch(f), size) for branch, f in zip(self.branches, features))


def attention_pooling(attention: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Eq. 1 and Fig. 4: M_j = GAP(A_j * f3) for each map j, concatenated (B, M*C), then
    sign(x) sqrt(|x|) and L2 normalisation (WS-DAN's bilinear attention pooling)."""
    b, m, h, w = attention.shape
    matrix = torch.einsum("bmhw,bchw->bmc", attention, features) / (h * w)
    matrix = matrix.reshape(b, -1)
    matrix = torch.sign(matrix) * torch.sqrt(matrix.abs() + 1e-12)
    return F.normalize(matrix, dim=-1)


class MAGSD(nn.Module):
    def __init__(self, backbone: str = "efficientnet_lite0", pretrained=None, in_chans: int = 1, num_classes: int = 3,
                 n_maps: int = 32, scales=(7, 14), pooling: str = "attention", dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        scales = tuple(sorted(int(s) for s in scales))
        if not scales or not set(scales) <= set(SCALE_LEVELS):
            raise ValueError(f"scales must be a non-empty subset of {sorted(SCALE_LEVELS)}, got {scales}")
        # The whole backbone first, so ImageNet weights load as usual; then its head is pruned.
        kwargs = {"drop_path_rate": drop_path} if drop_path else {}
        self.encoder = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained, **kwargs)
        self.encoder.prune_intermediate_layers((-3, -2, -1), prune_norm=False, prune_head=True)
        channels = [info["num_chs"] for info in self.encoder.feature_info[-3:]]  # f1, f2, f3
        self.scales, self.pooling, self.n_maps = scales, pooling, n_maps
        self.levels = [SCALE_LEVELS[s] for s in scales]
        self.attention = MultiscaleAttention([channels[level] for level in self.levels], n_maps)
        width = n_maps * channels[-1] if pooling == "attention" else channels[-1]
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> dict:
        features = self.encoder.forward_intermediates(x, indices=(-3, -2, -1), intermediates_only=True)
        f3 = features[-1]
        attention = self.attention([features[level] for level in self.levels], f3.shape[-2:])
        if self.pooling == "attention":
            pooled = attention_pooling(attention, f3) * WSDAN_SCALE
        elif self.pooling == "gap":
            pooled = f3.mean((2, 3))
        else:
            pooled = f3.amax((2, 3))
        return {"logits": self.classifier(self.dropout(pooled)), "attention": attention}

    def native_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The 32 attention maps A (B, M, h, w); the explainer averages them (MAG-SD's Fig. 7)."""
        return self.forward(x)["attention"]

    def target_layer(self) -> nn.Module:
        """The last backbone stage (f3), for CAM-family explanations."""
        return self.encoder.get_submodule(self.encoder.feature_info[-1]["module"])


def soft_distance_loss(raw_logits: torch.Tensor, aug_logits: list[torch.Tensor], target: torch.Tensor,
                       mode: str = "soft", confidence: float = 0.7, smoothing: float = 0.1) -> dict:
    """L_reg = L_ce(P(I), y) + sum over augmented passes of the mean distance (Eq. 7, Algorithm 1).

    mode 'soft' (Eq. 6): d'(x) = |P'(I) - p(x)|_1 with P'(I) = softmax P(I), detached, where the
    raw prediction is right with confidence > `confidence`, else the smoothed one-hot label.
    mode 'l2' (Table VIII): ||onehot(y) - p(x)||^2 against the label directly.
    """
    ce = F.cross_entropy(raw_logits, target)
    k = raw_logits.shape[1]
    onehot = F.one_hot(target, k).float()
    smooth = onehot * (1 - smoothing) + smoothing / k
    with torch.no_grad():
        raw = torch.softmax(raw_logits, dim=1)
        conf, pred = raw.max(1)
        trusted = (conf > confidence) & (pred == target)
        reference = torch.where(trusted[:, None], raw, smooth)
    distances = []
    for logits in aug_logits:
        p = torch.softmax(logits, dim=1)
        if mode == "soft":
            distances.append((reference - p).abs().sum(1).mean())
        elif mode == "l2":
            distances.append(((onehot - p) ** 2).sum(1).mean())
        else:
            raise ValueError(f"regularization mode must be 'soft' or 'l2', got {mode!r}")
    reg = torch.stack(distances).sum() if distances else ce.new_zeros(())
    return {"loss": ce + reg, "loss_ce": ce, "loss_reg": reg, "trusted": trusted.float().mean()}


@register_method
class MAGSDMethod(SupervisedMethod):
    """Sec. III-C/D: a raw pass, the attention guided augmentations made from that pass's detached
    attention maps, one pass per augmented batch, and the soft distance (or L2) regularization
    over all of them (Algorithm 1)."""

    name = "magsd"
    options = {"augmentations": list(AUGMENTATIONS), "regularization": "soft", "augment_per_step": 0,
               "confidence": 0.7, "smoothing": 0.1}

    def __init__(self, heads, train_cfg, options=None, seed: int = 0):
        super().__init__(heads, train_cfg, options, seed)
        import numpy as np

        self.head = next(h for h in self.heads if h.task == "multiclass")
        self._rng = np.random.default_rng(seed)

    def losses(self, model, batch, rng):
        cfg, x, y = self.opts, batch["image"], batch["targets"][self.head.name]
        raw = model(x)
        which = [a for a in AUGMENTATIONS if a in cfg["augmentations"]]
        per_step = int(cfg["augment_per_step"] or 0)
        if 0 < per_step < len(which):  # a CPU budget: a random subset of the augmentations each step
            which = list(self._rng.choice(which, size=per_step, replace=False))
        augmented = augment(x, raw["attention"], which)
        aug_logits = [model(images)[self.head.output] for images in augmented.values()]
        if cfg["regularization"] == "none":  # augmentations as plain extra training data
            ce = F.cross_entropy(raw[self.head.output], y)
            extra = sum((F.cross_entropy(lg, y) for lg in aug_logits), ce.new_zeros(()))
            return {"loss": ce + extra, "loss_ce": ce}
        out = soft_distance_loss(raw[self.head.output], aug_logits, y, mode=cfg["regularization"],
                                 confidence=cfg["confidence"], smoothing=cfg["smoothing"])
        return {"loss": out["loss"], "loss_ce": out["loss_ce"], "loss_reg": out["loss_reg"], "trusted": out["trusted"]}


register(ModelEntry(
    name="magsd", builder=MAGSD, fixed={"num_classes": len(CXR_CLASSES)}, method="magsd", heads=(CXR_DIAGNOSIS,),
    description="MAG-SD: multiscale attention, attention pooling, attention guided augmentation, soft distance "
                "(Li et al., JBHI 2021)",
    modality="CXR", preprocessing=CXR_PREPROCESS, paper="mag-sd_cxr_000",
))
