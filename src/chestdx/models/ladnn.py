"""LA-DNN: lesion-attention deep neural network (Liu et al., KDD 2020).

A backbone's pooled features feed two heads (paper Fig. 2): a primary COVID-19 head trained
with cross entropy L_P, and an auxiliary multi-label head over five lesions (GGO, Csld, CrPa,
AirBr, InSepThi) with sigmoid outputs and binary cross entropy L_A. The paper trains on
L = L_P + L_A (Sec. 2.2). The He et al. baseline is the same network without the lesion
head (`lesion_weight = 0`, `n_lesions = 0`).

Two departures from the official code, on purpose: lesion labels that are unknown (every
COVID-negative image, and positives without a report) are masked out of L_A instead of being
read as 0, and AUC is computed from probabilities, not thresholded predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chestdx.models.backbones import create_backbone

LESIONS = ("GGO", "Csld", "CrPa", "AirBr", "InSepThi")


class LADNN(nn.Module):
    def __init__(self, backbone: str = "efficientnet_lite0", pretrained=None, in_chans: int = 1,
                 n_lesions: int = len(LESIONS), dropout: float = 0.2, drop_path: float = 0.0):
        super().__init__()
        kwargs = {"drop_path_rate": drop_path} if drop_path else {}
        self.backbone = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained, **kwargs)
        # Pooled feature size; VGG adds a 4096-wide pre-logits MLP after its 512 channels.
        dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.dropout = nn.Dropout(dropout)
        self.covid_head = nn.Linear(dim, 1)
        self.lesion_head = nn.Linear(dim, n_lesions) if n_lesions else None

    def forward(self, x: torch.Tensor) -> dict:
        features = self.dropout(self.backbone(x))
        out = {"logits": self.covid_head(features).squeeze(-1)}
        if self.lesion_head is not None:
            out["lesion_logits"] = self.lesion_head(features)
        return out

    def target_layer(self) -> nn.Module:
        """The last convolutional stage, for CAM-family explanations."""
        return self.backbone.get_submodule(self.backbone.feature_info[-1]["module"])


def negatives_lesion_free(covid: torch.Tensor, lesions: torch.Tensor, known: torch.Tensor):
    """Lesion targets with every COVID-negative image read as showing none of the five lesions.

    The dataset leaves negatives' lesion labels unknown (some negatives are other pneumonias);
    the official code trains them as all-zero. Used as an option, it gives the lesion head
    negative examples, so L_A also separates COVID from non-COVID instead of only telling the
    COVID lesions apart."""
    negative = (covid == 0)[:, None]
    return lesions.masked_fill(negative, 0), known.masked_fill(negative, 1)


def ladnn_loss(out: dict, covid: torch.Tensor, lesions: torch.Tensor | None = None,
               lesion_mask: torch.Tensor | None = None, lesion_weight: float = 1.0,
               label_smoothing: float = 0.0) -> dict:
    """L = L_P + lambda * L_A (paper Sec. 2.2, lambda = 1).

    L_P: binary cross entropy of the COVID logit (two-class cross entropy with one logit).
    L_A: binary cross entropy of each lesion logit, averaged over the (image, lesion) entries
    whose label is known (`lesion_mask` = 1); zero when a batch has no known lesion label.
    """
    target = covid.float()
    if label_smoothing:
        target = target * (1 - label_smoothing) + 0.5 * label_smoothing
    loss_p = F.binary_cross_entropy_with_logits(out["logits"], target)
    result = {"loss_p": loss_p, "loss": loss_p}
    if lesion_weight and "lesion_logits" in out and lesions is not None:
        per_entry = F.binary_cross_entropy_with_logits(out["lesion_logits"], lesions.float(), reduction="none")
        mask = lesion_mask.float()
        loss_a = (per_entry * mask).sum() / mask.sum().clamp(min=1.0)
        result["loss_a"] = loss_a
        result["loss"] = loss_p + lesion_weight * loss_a
    return result
