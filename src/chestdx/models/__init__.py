"""Models: backbones in one registry, one module per published method."""

from chestdx.models.backbones import BACKBONES, backbone_names, create_backbone
from chestdx.models.ladnn import LADNN, LESIONS, ladnn_loss
from chestdx.models.registry import ModelEntry, create_model, get_entry, list_models, register

_CT_PREPROCESS = {"channels": 1, "resize": "pad", "clahe": False}

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

__all__ = ["BACKBONES", "LADNN", "LESIONS", "ModelEntry", "backbone_names", "create_backbone", "create_model",
           "get_entry", "ladnn_loss", "list_models", "register"]
