"""A plain classifier: a timm backbone, global average pooling and one linear layer.

The baseline MAG-SD is compared with (the paper's ResNet50 row in Table III), and the
reference for Grad-CAM localization on chest X-rays.
"""

from __future__ import annotations

import torch
from torch import nn

from chestdx.models.backbones import create_backbone
from chestdx.models.magsd import CXR_CLASSES, CXR_DIAGNOSIS, CXR_PREPROCESS
from chestdx.models.registry import ModelEntry, register


class PlainClassifier(nn.Module):
    def __init__(self, backbone: str = "efficientnet_lite0", pretrained=None, in_chans: int = 1, num_classes: int = 3,
                 dropout: float = 0.2, drop_path: float = 0.0):
        super().__init__()
        kwargs = {"drop_path_rate": drop_path} if drop_path else {}
        self.backbone = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained, **kwargs)
        dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.classifier(self.dropout(self.backbone(x)))}

    def target_layer(self) -> nn.Module:
        return self.backbone.get_submodule(self.backbone.feature_info[-1]["module"])


register(ModelEntry(
    name="cxr_plain", builder=PlainClassifier, fixed={"num_classes": len(CXR_CLASSES)}, heads=(CXR_DIAGNOSIS,),
    description="Plain CXR classifier: backbone, global average pooling, linear (MAG-SD's baseline)",
    modality="CXR", preprocessing=CXR_PREPROCESS, paper="mag-sd_cxr_000",
))
