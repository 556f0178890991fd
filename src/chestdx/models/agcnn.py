"""AG-CNN: attention guided convolutional neural network (Guan et al., "Diagnose like a radiologist").

- Global branch (Sec. III-A): a backbone's last convolutional block f_g, global max pooling
  (Pool5), one FC layer to the 15 outputs (14 ChestX-ray14 diseases + No Finding), a sigmoid per
  label and binary cross entropy (Eq. 1-2; `chestdx.tasks` multilabel head).
- Attention guided mask inference (Sec. III-B): the heat map H_g(x, y) = max_k |f_g^k(x, y)|
  (Eq. 3; the L1 and L2 statistics of Table III as options), resized to the input and scaled to
  [0, 1]; the mask M = H_g > tau (Eq. 4); the bounding box of its largest connected region
  (OpenCV, 8-connected) is cropped from the INPUT image and resized to the input size.
- Local branch: the same architecture with its own weights, on the crop.
- Fusion branch: Pool5 of both branches concatenated, one FC layer to the 15 outputs.
- Training (Algorithm 1, Sec. III-C): stages in the config (configs/agcnn_*.yaml); each stage's
  `train.head_weights` says which branch's loss it optimises, its `freeze:` which branches stay
  fixed, and `train.monitor` which branch's mean validation AUC picks its best epoch.

The crop is inside the model, so one bundle predicts from a raw image. The box is found on
the CPU (connected components are not a tensor op); the crop itself is an affine resampling
(`crop_and_resize`), so ONNX export is two graphs with the box between them (chestdx.export).
"""

from __future__ import annotations

import inspect

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chestdx.data.cxr14_labels import CXR14_LABELS, NIH_LABELS
from chestdx.models.backbones import create_backbone
from chestdx.models.registry import ModelEntry, register
from chestdx.tasks import Head
from chestdx.train.methods import SupervisedMethod, register_method

BRANCHES = ("global", "local", "fusion")
STATISTICS = ("max", "l1", "l2")
# Table I averages the 14 diseases; No Finding is trained and reported, not averaged in.
FUSION = Head("fusion", "multilabel", CXR14_LABELS, output="fusion", mean_over=NIH_LABELS)
GLOBAL = Head("global", "multilabel", CXR14_LABELS, output="global", mean_over=NIH_LABELS)
LOCAL = Head("local", "multilabel", CXR14_LABELS, output="local", mean_over=NIH_LABELS)
# Sec. IV-B: resized (not padded) to a square, ImageNet mean subtracted; no CLAHE.
AGCNN_PREPROCESS = {"channels": 1, "resize": "stretch", "size": 224, "clahe": False, "zscore": False}


def heat_map(features: torch.Tensor, statistic: str = "max") -> torch.Tensor:
    """Eq. 3 over the channels of (B, K, h, w): max_k |f_k| (the paper's), or Table III's L1
    (1/K) sum_k |f_k| and L2 (1/K) sqrt(sum_k f_k^2). Returns (B, h, w), not yet normalised."""
    a = features.float().abs()
    if statistic == "max":
        return a.amax(1)
    if statistic == "l1":
        return a.mean(1)
    if statistic == "l2":
        return a.pow(2).sum(1).sqrt() / a.shape[1]
    raise ValueError(f"heat-map statistic must be one of {STATISTICS}, got {statistic!r}")


def normalised_heat_map(features: torch.Tensor, size, statistic: str = "max") -> torch.Tensor:
    """The heat map resized (bilinear) to the input grid `size` and scaled to [0, 1] per image."""
    h = F.interpolate(heat_map(features, statistic)[:, None], size=tuple(size), mode="bilinear",
                      align_corners=False)[:, 0]
    low = h.flatten(1).amin(1)[:, None, None]
    high = h.flatten(1).amax(1)[:, None, None]
    return (h - low) / (high - low).clamp_min(1e-12)


def attention_box(heat: np.ndarray, tau: float) -> tuple[int, int, int, int]:
    """Eq. 4 and the region step: (x0, y0, x1, y1), end-exclusive pixels, of the largest 8-connected
    region of heat > tau; the whole image when no pixel passes (a flat map)."""
    mask = (np.asarray(heat) > tau).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return 0, 0, mask.shape[1], mask.shape[0]
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[k, :4])
    return x, y, x + w, y + h


def attention_boxes(heat: torch.Tensor, tau: float) -> torch.Tensor:
    """`attention_box` for a batch of maps (B, H, W): (B, 4) float boxes in pixels."""
    maps = heat.detach().float().cpu().numpy()
    return torch.tensor([attention_box(m, tau) for m in maps], dtype=torch.float32)


def crop_and_resize(x: torch.Tensor, boxes: torch.Tensor, size=None) -> torch.Tensor:
    """Crop box (x0, y0, x1, y1) of each image and resize it to `size` (default: the input's),
    bilinear. The sampling grid is built from the box with plain tensor ops (no affine_grid, which
    ONNX has only from opset 20), then one grid_sample."""
    b, _, height, width = x.shape
    out_h, out_w = tuple(size or (height, width))
    boxes = boxes.to(x.dtype)
    # Output pixel centres as fractions of the box, then as grid_sample coordinates
    # (align_corners=False: the pixel edges 0 and W of the input are -1 and 1).
    fx = (torch.arange(out_w, dtype=x.dtype, device=x.device) + 0.5) / out_w
    fy = (torch.arange(out_h, dtype=x.dtype, device=x.device) + 0.5) / out_h
    px = boxes[:, 0:1] + fx[None] * (boxes[:, 2:3] - boxes[:, 0:1])  # (B, out_w) input pixels
    py = boxes[:, 1:2] + fy[None] * (boxes[:, 3:4] - boxes[:, 1:2])  # (B, out_h)
    gx = (2 * px / width - 1)[:, None, :].expand(b, out_h, out_w)
    gy = (2 * py / height - 1)[:, :, None].expand(b, out_h, out_w)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def uncap_last_activation(backbone: nn.Module) -> None:
    """EfficientNet-Lite ends in ReLU6: the max over 1280 channels is then 6 over most of the image
    (7 x 7 grid, 8 cxr14-sample images: every box the whole image at tau 0.7), so Eq. 3 sees no
    peak. Its last activation becomes a plain ReLU, as ResNet-50's, the paper's backbone."""
    norm = getattr(backbone, "bn2", None)
    if isinstance(getattr(norm, "act", None), nn.ReLU6):
        norm.act = nn.ReLU()


class Branch(nn.Module):
    """A backbone's last convolutional block, Pool5 (global max or average pooling) and an FC layer."""

    def __init__(self, backbone: str, pretrained, in_chans: int, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.backbone = create_backbone(backbone, in_chans=in_chans, pretrained=pretrained)
        uncap_last_activation(self.backbone)
        self.width = self.backbone.num_features
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.width, num_labels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(x)
        pooled = features.amax((2, 3)) if self.pooling == "max" else features.mean((2, 3))
        return features, pooled, self.classifier(self.dropout(pooled))


class AGCNN(nn.Module):
    def __init__(self, backbone: str = "efficientnet_lite0", pretrained=None, in_chans: int = 1,
                 num_labels: int = len(CXR14_LABELS), tau: float = 0.7, statistic: str = "max",
                 pooling: str = "max", dropout: float = 0.0):
        super().__init__()
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' (the paper's Pool5) or 'avg', got {pooling!r}")
        if not 0.0 <= float(tau) < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {tau}")
        self.tau, self.statistic = float(tau), statistic
        self.global_branch = Branch(backbone, pretrained, in_chans, num_labels, pooling, dropout)
        self.local_branch = Branch(backbone, pretrained, in_chans, num_labels, pooling, dropout)
        self.fusion = nn.Linear(self.global_branch.width + self.local_branch.width, num_labels)

    def global_pass(self, x: torch.Tensor) -> dict:
        features, pooled, logits = self.global_branch(x)
        return {"global": logits, "global_pooled": pooled,
                "heatmap": normalised_heat_map(features, x.shape[-2:], self.statistic)}

    def local_pass(self, x: torch.Tensor, boxes: torch.Tensor, global_pooled: torch.Tensor | None) -> dict:
        """The local branch on the crops and, given the global Pool5, the fusion branch."""
        _, pooled, logits = self.local_branch(crop_and_resize(x, boxes))
        out = {"local": logits}
        if global_pooled is not None:
            out["fusion"] = self.fusion(torch.cat([global_pooled, pooled], dim=1))
        return out

    def forward(self, x: torch.Tensor, branches=BRANCHES, boxes: torch.Tensor | None = None) -> dict:
        """Every branch's logits, the heat map (B, H, W) and the crop boxes (B, 4: x0, y0, x1, y1 pixels).
        `branches` limits the work to what a training stage needs (the global pass always runs)."""
        out = self.global_pass(x)
        if "local" in branches or "fusion" in branches:
            boxes = attention_boxes(out["heatmap"], self.tau).to(x.device) if boxes is None else boxes
            out.update(self.local_pass(x, boxes, out["global_pooled"] if "fusion" in branches else None))
            out["boxes"] = boxes
        return out

    def export_parts(self) -> tuple[list, str]:
        """ONNX as two graphs with the box between them (connected components are no ONNX op): the
        global graph (image -> global logits, Pool5, heat map), `boxes_between` on its heat map, then
        the crop graph (image, boxes, global Pool5 -> local and fusion logits)."""
        from chestdx.export import ExportPart

        return [ExportPart("global", _GlobalGraph(self), ("image",), ("global", "global_pooled", "heatmap")),
                ExportPart("crop", _CropGraph(self), ("image", "boxes", "global_pooled"), ("local", "fusion"))], \
            "chestdx.models.agcnn:boxes_between"

    def native_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The global heat map H_g (B, 1, H, W): what decides the crop."""
        return self.global_pass(x)["heatmap"][:, None]

    def target_layer(self) -> nn.Module:
        """The global branch's last convolutional block, for CAM-family explanations."""
        return self.branch_layer("global")

    def cam_layer(self, head: str) -> nn.Module:
        """Each branch's CAM on its own last block; the fusion head's on the global branch's."""
        return self.branch_layer("local" if head == "local" else "global")

    def cam_to_input(self, maps: np.ndarray, x: torch.Tensor, head: str) -> np.ndarray:
        """The local branch's maps are on its crop: each is resized into its box on the input grid."""
        if head != "local":
            return maps
        with torch.no_grad():  # the global pass alone decides the box
            boxes = attention_boxes(self.global_pass(x)["heatmap"], self.tau).round().int().tolist()
        out = np.zeros((len(maps), *x.shape[-2:]), np.float32)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            if x1 > x0 and y1 > y0:
                out[k, y0:y1, x0:x1] = cv2.resize(np.asarray(maps[k], np.float32), (x1 - x0, y1 - y0),
                                                  interpolation=cv2.INTER_LINEAR)
        return out

    def branch_layer(self, branch: str) -> nn.Module:
        """The last convolutional block of the `global` or `local` branch."""
        backbone = {"global": self.global_branch, "local": self.local_branch}[branch].backbone
        return backbone.get_submodule(backbone.feature_info[-1]["module"])


class _GlobalGraph(nn.Module):
    def __init__(self, model: AGCNN):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model.global_pass(image)
        return out["global"], out["global_pooled"], out["heatmap"]


class _CropGraph(nn.Module):
    def __init__(self, model: AGCNN):
        super().__init__()
        self.model = model

    def forward(self, image, boxes, global_pooled):
        out = self.model.local_pass(image, boxes, global_pooled)
        return out["local"], out["fusion"]


def boxes_between(outputs: dict, model_kwargs: dict) -> dict:
    """The step between the exported graphs: the crop boxes from the global graph's heat map."""
    tau = float(model_kwargs.get("tau", inspect.signature(AGCNN).parameters["tau"].default))
    return {"boxes": attention_boxes(torch.from_numpy(np.asarray(outputs["heatmap"])), tau).numpy()}


@register_method
class AGCNNMethod(SupervisedMethod):
    """Algorithm 1: each stage optimises the heads its `train.head_weights` weigh (Eq. 2 per
    branch) and computes only the branches those heads need."""

    name = "agcnn"
    backbone_prefixes = ("global_branch.backbone.", "local_branch.backbone.")

    def losses(self, model, batch, rng):
        trained = [h.output for h in self.heads if self.weights[h.name]]
        return self.total(self.head_losses(model(batch["image"], branches=trained), batch))


register(ModelEntry(
    name="agcnn", builder=AGCNN, heads=(FUSION, GLOBAL, LOCAL), primary="fusion", method="agcnn",
    description="AG-CNN: global branch, heat-map crop, local branch, fusion (Guan et al.); 14 ChestX-ray14 "
                "diseases + No Finding",
    modality="CXR", preprocessing=AGCNN_PREPROCESS, paper="ag-cnn_cxr14_002",
))
