"""A seed ensemble: K copies of one registered model, trained from different seeds, answering as one.

Small datasets such as COVID-CT (425 training images) give test AUCs that move by several
points from one seed to the next; averaging the members' probabilities (Lakshminarayanan et
al., 2017, "deep ensembles") removes much of that variance. Each head's probabilities are
averaged the way its task defines them (`Task.combine`: sigmoids one by one, or softmax
vectors) and returned as logits, so every consumer (evaluation, the service, ONNX export,
CAMs) treats the ensemble as one model with the members' heads.
"""

from __future__ import annotations

import torch
from torch import nn


class Ensemble(nn.Module):
    rule = "mean"  # how the members' answers combine; other rules register (`register_ensemble_rule`)

    def __init__(self, members: list[nn.Module], heads):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.heads = list(heads)

    def forward(self, x: torch.Tensor) -> dict:
        outs = [member(x) for member in self.members]
        return {h.output: h.kind.combine([o[h.output] for o in outs]) for h in self.heads}

    def target_layers(self) -> list[nn.Module]:
        """Each member's CAM layer; pytorch-grad-cam averages the per-layer maps."""
        return [layer for member in self.members for layer in _member_layers(member)]

    def target_layer(self) -> nn.Module:
        return self.target_layers()[0]


def _member_layers(member: nn.Module) -> list[nn.Module]:
    if hasattr(member, "target_layers"):
        return member.target_layers()
    return [member.target_layer()] if hasattr(member, "target_layer") else []


ENSEMBLE_RULES: dict[str, type] = {"mean": Ensemble}


def register_ensemble_rule(name: str, cls: type) -> None:
    """An ensemble class a bundle's `ensemble_rule` names (e.g. DSAN's Eq. 5 `dual_sampling`)."""
    ENSEMBLE_RULES[name] = cls


def ensemble_class(rule: str | None) -> type:
    if (rule or "mean") not in ENSEMBLE_RULES:
        raise ValueError(f"unknown ensemble rule {rule!r}; known: {', '.join(sorted(ENSEMBLE_RULES))}")
    return ENSEMBLE_RULES[rule or "mean"]
