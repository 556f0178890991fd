"""ResNet50-ATT2: learn-to-pay-attention modules on two tapped stages (Loconte & Colavito, after
Jetley et al., ICLR 2018), written for any timm backbone.

Sec. III-B: the local features X of a tapped stage are projected into the space of the global
feature g (Eq. 7, `W_p`), scored against g by a compatibility function, the additive
c_i = <u, x_hat_i + g> (Eq. 11, the paper's choice) or the dot product <x_hat_i, g> (Eq. 12),
normalised by a softmax over positions (Eq. 9), and the attended feature g_hat = sum_i a_i x_i
(Eq. 10) pools the unprojected local features. Sec. IV-A: the g_hat of the two modules are
concatenated (1024 + 2048 = 3072 for ResNet-50) into one linear classifier.

The paper's network is ResNet-50 tapped after layer3 (1024 x 14 x 14) and layer4 (2048 x 7 x 7),
with a tail of three more bottleneck blocks before the global pooling that gives g
(`backbone: resnet50, tail_blocks: 3`). `taps` are stage indices into the backbone's feature_info,
and `final` for its last feature map (`forward_features`: ResNet's layer4, EfficientNet's map after
its 1x1 head convolution). The CPU configuration taps EfficientNet-Lite0 at 112 x 14 x 14 and at
its final 1280 x 7 x 7 map (its last stage, 320 x 7 x 7, gave validation AUC 0.77 against 0.92 for
LA-DNN: the ImageNet head convolution's features are the ones that carry over).

A property of Eq. 11 worth knowing: <u, g> is the same for every position, and a softmax does not
change when every score moves by the same amount, so under the additive compatibility g (and the
tail that computes it) has no influence on the attention or the output and gets no gradient:
each module learns a saliency <u, W_p x_i> of its own features. The dot product of Eq. 12 makes
the attention depend on g. Both are implemented as written; `test_att2.py` checks this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck
from torch import nn

from chestdx.errors import ChestDxError
from chestdx.models.backbones import create_backbone
from chestdx.models.registry import ModelEntry, register
from chestdx.tasks import Head

COMPATIBILITIES = ("additive", "dot")
FINAL = "final"  # a tap on the backbone's last feature map (after its head convolution, if it has one)


class AttentionModule(nn.Module):
    """One attention estimator: local features (B, C, *spatial) and the global feature (B, G) in,
    the attended feature g_hat (B, C) and the attention (B, *spatial), summing to 1, out."""

    def __init__(self, local_dim: int, global_dim: int, compatibility: str = "additive"):
        super().__init__()
        if compatibility not in COMPATIBILITIES:
            raise ChestDxError(f"att2: compatibility must be one of {', '.join(COMPATIBILITIES)}, "
                               f"got {compatibility!r}")
        self.compatibility = compatibility
        self.project = nn.Linear(local_dim, global_dim, bias=False)  # W_p, Eq. 7
        self.u = nn.Linear(global_dim, 1, bias=False) if compatibility == "additive" else None  # Eq. 11

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = x.flatten(2).transpose(1, 2)  # (B, N, C): x_i, one row per position
        projected = self.project(local)  # x_hat_i = W_p x_i (Eq. 7)
        if self.u is not None:
            scores = self.u(projected + g[:, None, :]).squeeze(-1)  # <u, x_hat_i + g> (Eq. 11)
        else:
            scores = (projected * g[:, None, :]).sum(-1)  # <x_hat_i, g> (Eq. 12)
        attention = torch.softmax(scores, dim=1)  # Eq. 9
        attended = (attention[:, :, None] * local).sum(1)  # g_hat = sum_i a_i x_i (Eq. 10)
        return attended, attention.view(x.shape[0], *x.shape[2:])


class ATT2(nn.Module):
    """A timm backbone with attention modules on the stages `taps` (indices into its feature_info)
    and a linear classifier on their concatenated g_hat. `n_outputs`: 1 (one binary logit) or K."""

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained=None, in_chans: int = 1,
                 n_outputs: int = 1, taps: tuple = (-2, "final"), tail_blocks: int = 0,
                 compatibility: str = "additive", dropout: float = 0.0):
        super().__init__()
        self.backbone = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained)
        info = self.backbone.feature_info
        n = len(info)
        stages = [t for t in taps if t != FINAL]
        if any(not isinstance(t, int) or not -n <= t < n for t in stages) or \
                len({t % n for t in stages}) != len(stages) or len(taps) - len(stages) > 1 or not taps:
            raise ChestDxError(f"att2: taps {list(taps)} must be distinct stage indices of {backbone} "
                               f"(it has {n} stages, -{n}..{n - 1}) and at most one '{FINAL}'")
        self.taps = sorted(t % n for t in stages)
        self.tap_final = FINAL in taps
        global_dim = self.backbone.num_features
        # The paper's tail: more bottleneck blocks on the last features before the global pooling.
        self.tail = nn.Sequential(*[Bottleneck(global_dim, global_dim // 4) for _ in range(int(tail_blocks))])
        widths = [info[t]["num_chs"] for t in self.taps] + ([global_dim] if self.tap_final else [])
        self.attention = nn.ModuleList(AttentionModule(c, global_dim, compatibility) for c in widths)
        self.embedding_dim = sum(widths)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.embedding_dim, int(n_outputs))
        self.n_outputs = int(n_outputs)

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the concatenated g_hat (B, E), the attention maps of the modules, finest first)."""
        if self.taps:
            final, tapped = self.backbone.forward_intermediates(x, indices=self.taps)
        else:  # only the final map is tapped
            final, tapped = self.backbone.forward_features(x), []
        tapped = list(tapped) + ([final] if self.tap_final else [])
        g = self.tail(final).mean(dim=(2, 3))  # global average pooling
        attended, maps = zip(*(module(local, g) for module, local in zip(self.attention, tapped)))
        return torch.cat(attended, dim=1), list(maps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The slice embedding the sequence model reads (3072 wide for the paper's ResNet-50)."""
        return self.attend(x)[0]

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.dropout(embedding))
        return logits.squeeze(-1) if self.n_outputs == 1 else logits

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.classify(self.embed(x))}

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.attend(x)[1]

    def native_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The modules' maps combined for display, sqrt(a * b) on the finest grid (B, 1, h, w), each map
        min-max normalised before and the result after (chestdx.explain.postprocess.sqrt_product): high
        where both modules attend."""
        maps = self.attention_maps(x)
        size = maps[0].shape[1:]
        combined = None
        for m in maps:
            m = _unit(F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False))
            combined = m if combined is None else combined * m
        return _unit(combined ** (1.0 / len(maps)))

    def target_layer(self) -> nn.Module:
        """The last tapped stage, for the CAM family."""
        if self.tap_final:
            return _final_features_module(self.backbone)
        return self.backbone.get_submodule(self.backbone.feature_info[self.taps[-1]]["module"])


def _unit(m: torch.Tensor) -> torch.Tensor:
    """Each map of (B, 1, *spatial) min-max scaled to [0, 1]."""
    flat = m.flatten(1)
    shape = (-1,) + (1,) * (m.ndim - 1)
    lo, hi = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
    return (m - lo) / (hi - lo).clamp(min=1e-12)


def _final_features_module(backbone: nn.Module) -> nn.Module:
    """The module whose output is `forward_features`: EfficientNet's head activation, ResNet's layer4."""
    for name in ("bn2", "conv_head"):
        if hasattr(backbone, name):
            return getattr(backbone, name)
    return backbone.get_submodule(backbone.feature_info[-1]["module"])


DIAGNOSIS = Head("diagnosis", "binary", ("noncovid", "covid"), output="logits")
DIAGNOSIS_3 = Head("diagnosis", "multiclass", ("normal", "pneumonia", "covid"), output="logits")
_PREPROCESS = {"channels": 1, "resize": "pad", "clahe": False, "hu_window": [-600, 1500]}  # lung window for DICOM CT
_PAPER = "resnet50-att2-bilstm_ct_004"

register(ModelEntry(
    name="att2", builder=ATT2, fixed={"n_outputs": 1}, heads=(DIAGNOSIS,),
    description="ResNet50-ATT2: two learn-to-pay-attention modules on a backbone, COVID vs not (Loconte et al.)",
    modality="CT", preprocessing=_PREPROCESS, paper=_PAPER,
))
register(ModelEntry(
    name="att2_3class", builder=ATT2, fixed={"n_outputs": 3}, heads=(DIAGNOSIS_3,),
    description="ResNet50-ATT2 on the paper's three classes: normal, pneumonia, COVID-19 (COVIDx-CT)",
    modality="CT", preprocessing=_PREPROCESS, paper=_PAPER,
))
