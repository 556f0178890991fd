"""Model registry in the style of timm's: name -> builder + metadata.

Metadata is what a user of a trained model needs without reading code: the task's classes,
the lesion names, the input size and the preprocessing, and the operating threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from chestdx.errors import ChestDxError


@dataclass
class ModelEntry:
    name: str
    builder: Callable
    description: str
    modality: str
    classes: tuple
    lesions: tuple = ()
    input_size: int = 224
    preprocessing: dict = field(default_factory=dict)
    threshold: float = 0.5
    paper: str = ""


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


def create_model(name: str, **kwargs):
    return get_entry(name).builder(**kwargs)
