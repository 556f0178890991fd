"""Models: backbones in one registry, one module per published method, each registering its
models (and its training method) beside them."""

from chestdx.models.agcnn import AGCNN
from chestdx.models.att2 import ATT2
from chestdx.models.dsan import DSAN
from chestdx.models.backbones import BACKBONES, backbone_names, create_backbone
from chestdx.models.ladnn import LADNN, LESIONS
from chestdx.models.magsd import MAGSD
from chestdx.models.plain import PlainClassifier
from chestdx.models.registry import ModelEntry, create_model, get_entry, list_models, load_plugins, register
from chestdx.models.seqattn import SequenceAttention

load_plugins()  # CHESTDX_PLUGINS: modules that register more models and methods

__all__ = ["AGCNN", "ATT2", "SequenceAttention", "BACKBONES", "LADNN", "MAGSD", "PlainClassifier", "LESIONS", "ModelEntry", "backbone_names", "create_backbone",
           "create_model", "get_entry", "list_models", "register"]
