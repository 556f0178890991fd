"""LA-DNN: lesion-attention deep neural network (Liu et al., KDD 2020).

A backbone's pooled features feed two heads (paper Fig. 2): a primary COVID-19 head trained
with cross entropy L_P, and an auxiliary multi-label head over five lesions (GGO, Csld, CrPa,
AirBr, InSepThi) with sigmoid outputs and binary cross entropy L_A. The paper trains on
L = L_P + L_A (Sec. 2.2). The He et al. baseline is the same network without the lesion
head (registered as `covid_baseline`).
The loss is `LADNNMethod`: the two heads' task losses (chestdx.tasks) summed.

Two departures from the official code, on purpose: lesion labels that are unknown (every
COVID-negative image, and positives without a report) are masked out of L_A instead of being
read as 0, and AUC is computed from probabilities, not thresholded predictions.
"""

from __future__ import annotations

import torch
from torch import nn

from chestdx.models.backbones import create_backbone
from chestdx.models.registry import ModelEntry, register
from chestdx.tasks import Head
from chestdx.train.methods import SupervisedMethod, register_method

LESIONS = ("GGO", "Csld", "CrPa", "AirBr", "InSepThi")
DIAGNOSIS = Head("diagnosis", "binary", ("noncovid", "covid"), output="logits")
LESION_HEAD = Head("lesions", "multilabel", LESIONS, output="lesion_logits")


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


@register_method
class LADNNMethod(SupervisedMethod):
    """L = L_P + lambda L_A (Sec. 2.2): the supervised sum over the two heads, lambda from
    `train.head_weights.lesions`; optionally every COVID-negative image reads as lesion-free."""

    name = "ladnn"
    options = {"negatives_lesion_free": False}

    def losses(self, model, batch, rng):
        if self.opts["negatives_lesion_free"] and "lesions" in batch["targets"]:
            targets, known = dict(batch["targets"]), dict(batch["known"])
            targets["lesions"], known["lesions"] = negatives_lesion_free(
                batch["targets"]["diagnosis"], targets["lesions"], known["lesions"])
            batch = {**batch, "targets": targets, "known": known}
        return super().losses(model, batch, rng)


# DICOM CT input is windowed from HU by the lung window (-600 / 1500), the window of covid-ct's
# figures, never by the file's own VOI window (often mediastinal: the lungs come out black).
_CT_PREPROCESS = {"channels": 1, "resize": "pad", "clahe": False, "hu_window": [-600, 1500]}
register(ModelEntry(
    name="ladnn", builder=LADNN, fixed={"n_lesions": len(LESIONS)}, method="ladnn", heads=(DIAGNOSIS, LESION_HEAD), primary="diagnosis",
    description="LA-DNN: backbone + COVID head + auxiliary five-lesion head (Liu et al., KDD 2020)",
    modality="CT", preprocessing=_CT_PREPROCESS, paper="la-dnn_ct_online_003",
))
register(ModelEntry(
    name="covid_baseline", builder=LADNN, fixed={"n_lesions": 0}, method="ladnn", heads=(DIAGNOSIS,),
    description="He et al. baseline: the LA-DNN backbone with the COVID head only",
    modality="CT", preprocessing=_CT_PREPROCESS, paper="la-dnn_ct_online_003",
))
