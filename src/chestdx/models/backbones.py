"""The one registry of 2D backbones: chestdx names -> timm architectures, plus weight loading.

Grey-scale input (1 channel) is made from RGB-pretrained stems by summing the stem's three
input filters (timm's `adapt_input_conv`), so a grey image x gives the same activations as
the RGB image (x, x, x) when the normalisation is equal across channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
from timm.models import adapt_input_conv
from timm.utils.model import freeze
from torch import nn

from chestdx.errors import ChestDxError
from chestdx.models.weights import load_state_dict_file, match_by_order, resolve_weights


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    mean: tuple
    std: tuple


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

BACKBONES = {
    # TF-ported EfficientNet-Lite0/1/2: TF "same" padding, BN eps 1e-3, inputs scaled to [-1, 1].
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", HALF, HALF),
    "efficientnet_lite1": BackboneSpec("tf_efficientnet_lite1", HALF, HALF),  # 240 px native
    "efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", HALF, HALF),  # 260 px native
    "efficientnet_b0": BackboneSpec("efficientnet_b0", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b1": BackboneSpec("efficientnet_b1", IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": BackboneSpec("resnet18", IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": BackboneSpec("resnet50", IMAGENET_MEAN, IMAGENET_STD),
    "densenet121": BackboneSpec("densenet121", IMAGENET_MEAN, IMAGENET_STD),
    "densenet169": BackboneSpec("densenet169", IMAGENET_MEAN, IMAGENET_STD),
    "vgg16": BackboneSpec("vgg16", IMAGENET_MEAN, IMAGENET_STD),
}


def backbone_names() -> list[str]:
    return sorted(BACKBONES)


def create_backbone(name: str, in_chans: int = 1, pretrained=None, num_classes: int = 0, **kwargs) -> nn.Module:
    """A timm model without its classifier (num_classes=0 gives pooled features)."""
    if name not in BACKBONES:
        raise ChestDxError(f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}")
    spec = BACKBONES[name]
    weights = resolve_weights(name, pretrained)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if weights is not None:
        load_pretrained(model, weights, in_chans)
    return model


def frozen_modules(backbone: nn.Module, stages: int) -> list[str]:
    """Names of the stem and the first `stages` feature stages (timm's `feature_info`), in order."""
    info = getattr(backbone, "feature_info", None)
    if stages <= 0:
        return []
    if info is None or stages > len(info):
        raise ChestDxError(f"cannot freeze {stages} stages of {type(backbone).__name__}: it has {len(info or [])}")
    path = info[stages - 1]["module"].split(".")
    names, module, prefix = [], backbone, ""
    for depth, part in enumerate(path):
        children = [n for n, _ in module.named_children()]
        is_stage = depth == len(path) - 1  # the stage's parents stay partly trainable
        names += [prefix + n for n in children[:children.index(part) + is_stage]]
        module, prefix = getattr(module, part), f"{prefix}{part}."
    return names


def freeze_stages(backbone: nn.Module, stages: int) -> list[str]:
    """Stop training the stem and the first `stages` feature stages of a timm backbone.

    The early, high-resolution layers cost much of a CPU training step (EfficientNet-Lite0, 288 px,
    batch 32, one core: 5.3 s -> 3.5 s with the stem and two stages frozen) and hold generic edge
    filters that ImageNet weights already give. Their batch norms keep adapting their running
    statistics to the new images."""
    names = frozen_modules(backbone, stages)
    if names:
        freeze(backbone, names, include_bn_running_stats=False)
    return names


def load_pretrained(model: nn.Module, path, in_chans: int) -> None:
    """Load a 3-channel ImageNet state dict, adapting the stem and skipping the old classifier."""
    cfg = model.pretrained_cfg
    reference = timm.create_model(cfg["architecture"], pretrained=False, num_classes=1000)
    source = match_by_order(load_state_dict_file(path), reference.state_dict(), path)
    stem = cfg["first_conv"] + ".weight"
    if in_chans != 3 and stem in source:
        source[stem] = adapt_input_conv(in_chans, source[stem])
    classifier = cfg["classifier"]
    own = model.state_dict()
    source = {k: v for k, v in source.items() if not k.startswith(classifier + ".") or (k in own and own[k].shape == v.shape)}
    missing, unexpected = model.load_state_dict(source, strict=False)
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise ChestDxError(f"{path}: weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def grey_normalisation(name: str) -> dict:
    """Mean/std for 1-channel input: the stem sums the RGB filters, so one value stands for all three."""
    spec = BACKBONES[name]
    return {"mean": float(sum(spec.mean) / 3), "std": float(sum(spec.std) / 3)}


def input_normalisation(model_config: dict) -> dict:
    """The config's backbone's grey normalisation; mean 0.5, std 0.5 for a model without one."""
    name = model_config.get("backbone")
    return grey_normalisation(name) if name in BACKBONES else {"mean": 0.5, "std": 0.5}
