"""Model registry in the style of timm's: each method module registers its models beside them.

An entry is what a user of a model needs without reading code, and every field is read:
the heads (task kind and labels of each output; `primary` is the diagnosis), the training
method (`chestdx.train.methods`), the kind of sample it takes (`image`, `volume` or `sequence`,
with `spatial_dims`), the modality (shown by `chestdx models` and the service), the
preprocessing the paper prescribes (the config's defaults for `preprocess`), and the paper.
The builder's keyword parameters are the config's `model:` options (`options()`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from chestdx.errors import ChestDxError
from chestdx.tasks import Head

SAMPLE_KINDS = ("image", "volume", "sequence")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable
    description: str
    modality: str
    heads: tuple
    primary: str = ""
    method: str = "supervised"
    sample: str = "image"
    spatial_dims: int = 2
    fixed: dict = field(default_factory=dict)  # builder arguments this entry sets (not options)
    preprocessing: dict = field(default_factory=dict)
    paper: str = ""

    def __post_init__(self):
        if not self.heads:
            raise ValueError(f"model {self.name!r} declares no heads")
        if not self.primary:
            object.__setattr__(self, "primary", self.heads[0].name)
        if self.primary not in [h.name for h in self.heads]:
            raise ValueError(f"model {self.name!r}: primary head {self.primary!r} is not one of its heads")
        if self.sample not in SAMPLE_KINDS:
            raise ValueError(f"model {self.name!r}: sample kind {self.sample!r} not in {SAMPLE_KINDS}")

    @property
    def primary_head(self) -> Head:
        return next(h for h in self.heads if h.name == self.primary)

    @property
    def classes(self) -> tuple:
        return self.primary_head.labels

    def options(self) -> dict:
        """The `model:` options and their defaults: the builder's keyword parameters that the
        entry does not fix (`pretrained` is the init, handled apart)."""
        params = inspect.signature(self.builder).parameters
        return {k: (None if p.default is inspect.Parameter.empty else p.default)
                for k, p in params.items()
                if k not in self.fixed and k != "pretrained" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def build(self, pretrained=None, **kwargs):
        """The model; `pretrained` (initial weights) goes only to builders that take it."""
        if "pretrained" in inspect.signature(self.builder).parameters:
            kwargs["pretrained"] = pretrained
        elif pretrained:
            raise ChestDxError(f"model {self.name!r} has no pretrained weights; set model.pretrained: null")
        return self.builder(**self.fixed, **kwargs)


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ChestDxError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def load_plugins(names: str | None = None) -> None:
    """Import the comma-separated modules of CHESTDX_PLUGINS, each registering its models beside them
    (a method developed outside this package, or a test's toy models in a subprocess)."""
    import importlib
    import os

    for module in filter(None, (names if names is not None else os.environ.get("CHESTDX_PLUGINS", "")).split(",")):
        try:
            importlib.import_module(module.strip())
        except ImportError as err:
            raise ChestDxError(f"CHESTDX_PLUGINS: cannot import {module.strip()!r} ({err})") from None


def create_model(name: str, **kwargs):
    return get_entry(name).build(**kwargs)
