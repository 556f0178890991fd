"""A seed ensemble: K copies of one registered model, trained from different seeds, answering as one.

Small datasets such as COVID-CT (425 training images) give test AUCs that move by several
points from one seed to the next; averaging the members' probabilities (Lakshminarayanan et
al., 2017, "deep ensembles") removes much of that variance. The ensemble returns the same
outputs as its members, as logits of the averaged probabilities, so every consumer
(evaluation, the service, ONNX export, CAMs) treats it as one model.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS = 1e-6


def _mean_sigmoid_logit(logits: list[torch.Tensor]) -> torch.Tensor:
    p = torch.stack([torch.sigmoid(lg) for lg in logits]).mean(0).clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


def _mean_softmax_log(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.softmax(lg, dim=1) for lg in logits]).mean(0).clamp_min(_EPS).log()


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> dict:
        outs = [member(x) for member in self.members]
        logits = [o["logits"] for o in outs]
        combined = {"logits": _mean_sigmoid_logit(logits) if logits[0].ndim == 1 else _mean_softmax_log(logits)}
        if "lesion_logits" in outs[0]:  # independent sigmoids, averaged one by one
            combined["lesion_logits"] = _mean_sigmoid_logit([o["lesion_logits"] for o in outs])
        return combined

    def target_layers(self) -> list[nn.Module]:
        """Each member's CAM layer; pytorch-grad-cam averages the per-layer maps."""
        return [layer for member in self.members for layer in _member_layers(member)]

    def target_layer(self) -> nn.Module:
        return self.target_layers()[0]


def _member_layers(member: nn.Module) -> list[nn.Module]:
    if hasattr(member, "target_layers"):
        return member.target_layers()
    return [member.target_layer()] if hasattr(member, "target_layer") else []
