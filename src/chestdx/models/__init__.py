"""Models: backbones in one registry, one module per published method."""

from chestdx.models.backbones import BACKBONES, backbone_names, create_backbone
from chestdx.models.ladnn import LADNN, LESIONS, ladnn_loss
from chestdx.models.magsd import MAGSD
from chestdx.models.plain import PlainClassifier
from chestdx.models.registry import ModelEntry, create_model, get_entry, list_models, register

_CT_PREPROCESS = {"channels": 1, "resize": "pad", "clahe": False}
_CXR_PREPROCESS = {"channels": 1, "resize": "pad", "clahe": True, "zscore": True}
_CXR_CLASSES = ("normal", "pneumonia", "covid")

register(ModelEntry(
    name="ladnn",
    builder=lambda **kw: LADNN(**kw),
    description="LA-DNN: backbone + COVID head + auxiliary five-lesion head (Liu et al., KDD 2020)",
    modality="CT",
    classes=("noncovid", "covid"),
    lesions=LESIONS,
    preprocessing=_CT_PREPROCESS,
    paper="la-dnn_ct_online_003",
))
register(ModelEntry(
    name="covid_baseline",
    builder=lambda **kw: LADNN(n_lesions=0, **kw),
    description="He et al. baseline: the LA-DNN backbone with the COVID head only",
    modality="CT",
    classes=("noncovid", "covid"),
    preprocessing=_CT_PREPROCESS,
    paper="la-dnn_ct_online_003",
))
register(ModelEntry(
    name="magsd",
    builder=lambda **kw: MAGSD(num_classes=len(_CXR_CLASSES), **kw),
    description="MAG-SD: multiscale attention, attention pooling, attention guided augmentation, soft distance "
                "(Li et al., JBHI 2021)",
    modality="CXR",
    classes=_CXR_CLASSES,
    preprocessing=_CXR_PREPROCESS,
    paper="mag-sd_cxr_000",
))
register(ModelEntry(
    name="cxr_plain",
    builder=lambda **kw: PlainClassifier(num_classes=len(_CXR_CLASSES), **kw),
    description="Plain CXR classifier: backbone, global average pooling, linear (MAG-SD's baseline)",
    modality="CXR",
    classes=_CXR_CLASSES,
    preprocessing=_CXR_PREPROCESS,
    paper="mag-sd_cxr_000",
))

__all__ = ["BACKBONES", "LADNN", "MAGSD", "PlainClassifier", "LESIONS", "ModelEntry", "backbone_names", "create_backbone", "create_model",
           "get_entry", "ladnn_loss", "list_models", "register"]
