"""Experiment configs: one YAML per paper reproduction, with dotted command-line overrides.

Every key lives in one schema (`SCHEMA`, a `Key` per key: default, type, choices, meaning);
`DEFAULTS` is derived from it. Two sections depend on the model: `model:` holds the registry
entry's builder options (`ModelEntry.options()`) and `method:` its training method's options
(`get_method(entry.method).options`); `preprocess:` starts from the paper's preprocessing that
the entry prescribes. `load_config` merges file and `--set` overrides, then `validate` checks
every key and fills in every default, so a typo or a wrong type fails at once with one line
naming the key (and the closest valid one) instead of being ignored or failing mid-run.

Merge order: schema defaults < (preprocess: the model entry's `preprocessing`) < the file
(with its `base:` chain) < `--set`.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chestdx.errors import ChestDxError

# --------------------------------------------------------------------------------------------
# Types. Each converts a value (returning it, possibly normalised) or raises _Bad.

# YAML 1.1 (PyYAML) reads 1e-3, written without a dot, as a string; everyone means the number.
_SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class _Bad(Exception):
    """A value that does not fit its type; `Key.check` words the message."""


class Spec:
    what = "anything"

    def __call__(self, value):
        return value


class _Any(Spec):
    what = "anything"

    def __call__(self, value):
        return _numbers(value)


class _Bool(Spec):
    what = "true or false"

    def __call__(self, value):
        if not isinstance(value, bool):
            raise _Bad
        return value


class _Str(Spec):
    what = "a string"

    def __call__(self, value):
        if not isinstance(value, str):
            raise _Bad
        return value


class Int(Spec):
    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max
        self.what = "an integer" + _bounds(min, max)

    def __call__(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise _Bad
        return value


class Number(Spec):
    """An int or a float (kept as given; `1e-3` read as a string by YAML 1.1 becomes the float)."""

    def __init__(self, min: float | None = None, max: float | None = None, below: float | None = None,
                 above: float | None = None):
        self.min, self.max, self.below, self.above = min, max, below, above
        if min is not None and max is not None:
            self.what = f"a number between {min:g} and {max:g}"
        else:
            bounds = [f">= {min:g}" if min is not None else "", f"> {above:g}" if above is not None else "",
                      f"< {below:g}" if below is not None else "", f"<= {max:g}" if max is not None else ""]
            self.what = " ".join(["a number", " and ".join(b for b in bounds if b)]).strip()

    def __call__(self, value):
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad
        if value != value:  # NaN
            raise _Bad
        if ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)
                or (self.below is not None and value >= self.below) or (self.above is not None and value <= self.above)):
            raise _Bad
        return value


class Nullable(Spec):
    def __init__(self, inner: Spec):
        self.inner = inner
        self.what = f"null or {inner.what}"

    def __call__(self, value):
        return None if value is None else self.inner(value)


class AnyOf(Spec):
    def __init__(self, *specs: Spec, what: str | None = None):
        self.specs = specs
        self.what = what or " or ".join(s.what for s in specs)

    def __call__(self, value):
        for spec in self.specs:
            try:
                return spec(value)
            except _Bad:
                continue
        raise _Bad


class Literal(Spec):
    def __init__(self, *values):
        self.values = values
        self.what = " or ".join(repr(v) for v in values)

    def __call__(self, value):
        if value in self.values and type(value) in {type(v) for v in self.values}:
            return value
        raise _Bad


class ListOf(Spec):
    """A YAML list (a tuple is accepted too); `length` fixes its length."""

    def __init__(self, item: Spec, length: int | None = None, what: str | None = None):
        self.item, self.length = item, length
        items = _plural(item.what)
        self.what = what or (f"a list of {length} {items}" if length else f"a list of {items}")

    def __call__(self, value):
        if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
            raise _Bad
        return [self.item(v) for v in value]


class MapOf(Spec):
    """A mapping with string keys."""

    def __init__(self, value: Spec, what: str | None = None):
        self.value = value
        self.what = what or f"a mapping of names to {_plural(value.what)}"

    def __call__(self, value):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Bad
        return {k: self.value(v) for k, v in value.items()}


def _bounds(min, max) -> str:
    if min is not None and max is not None:
        return f" from {min} to {max}"
    if min is not None:
        return f" >= {min}"
    if max is not None:
        return f" <= {max}"
    return ""


def _plural(what: str) -> str:
    for article in ("an ", "a "):
        if what.startswith(article):
            head, _, rest = what[len(article):].partition(" ")
            return f"{head}s" + (f" {rest}" if rest else "")
    return what


ANY, BOOL, STR, INT, NUMBER = _Any(), _Bool(), _Str(), Int(), Number()
PROBABILITY = Number(0, 1)
PAIR = ListOf(NUMBER, 2, what="a [low, high] pair of numbers")

MISSING = object()  # a key without a default: left out unless set (e.g. filled in later)


@dataclass(frozen=True)
class Key:
    """One config key: its default (MISSING: none), its type, its allowed values, its meaning."""

    default: Any = MISSING
    type: Spec = ANY
    choices: tuple | None = None
    doc: str = ""

    def check(self, value, path: str):
        try:
            value = self.type(value)
        except _Bad:
            raise ChestDxError(f"config: {path} must be {self.type.what}, got {_show(value)}") from None
        if self.choices is not None and value not in self.choices:
            raise ChestDxError(f"config: {path} must be one of {', '.join(map(str, self.choices))}, "
                               f"got {_show(value)}")
        return value

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------
# The schema.

PRECISIONS = ("auto", "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
              "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")

# Today's model defaults, used where the model has the option (they override the builder's own
# defaults: a config that does not set `dropout` trains with 0.2, as it always has).
MODEL_KEYS = {
    "name": Key("ladnn", STR, doc="registered model (`chestdx models`)"),
    "pretrained": Key("imagenet", Nullable(STR), doc="initial weights: imagenet, a weight file, or null"),
}
MODEL_OPTION_DEFAULTS = {
    "backbone": Key("efficientnet_lite0", STR, doc="feature extractor (models/backbones.py)"),
    "dropout": Key(0.2, Number(min=0, below=1), doc="dropout before the heads"),
    "drop_path": Key(0.0, Number(min=0, below=1), doc="stochastic depth of the backbone"),
}

SECTIONS: dict[str, dict[str, Key]] = {
    "paper": {  # metadata, never read by training
        "source": Key(type=STR, doc="which table / row of the paper"),
        "results": Key(type=MapOf(NUMBER, what="a mapping of metric names to numbers"),
                       doc="the paper's reported numbers"),
    },
    "preprocess": {
        "size": Key(224, AnyOf(Int(min=1), ListOf(Int(min=1)),
                               what="an integer >= 1 (or a list: one size per spatial axis)"),
                    doc="side of the network input"),
        "resize": Key("pad", STR, choices=("pad", "stretch"), doc="pad: keep the aspect ratio"),
        "channels": Key(1, Int(min=1), doc="input channels"),
        "clahe": Key(False, BOOL, doc="contrast limited adaptive histogram equalisation"),
        "clahe_clip": Key(4.0, Number(above=0), doc="CLAHE clip limit"),
        "clahe_tiles": Key(4, Int(min=1), doc="CLAHE tiles per side"),
        "zscore": Key(False, BOOL, doc="per-image z-score instead of the backbone's mean/std"),
        "mean": Key(type=NUMBER, doc="input mean (default: the backbone's, filled in by training)"),
        "std": Key(type=Number(above=0), doc="input std (default: the backbone's)"),
        "window": Key(None, Nullable(ListOf(NUMBER, 2, what="a [center, width] pair of numbers")),
                      doc="CT intensity window applied first"),
        "lung_crop": Key(False, BOOL, doc="crop each slice to its lung box (classical lung mask), as ResNet50-ATT2"),
        "spacing": Key(None, Nullable(ListOf(Number(above=0), 3, what="three spacings in mm (slice axis first)")),
                       doc="volumes: resample to this voxel spacing (mm, slice axis first) before fitting to `size`"),
        "lung_mask": Key(False, BOOL, doc="zero everything outside the lungs (classical lung mask: 2D slice by "
                                          "slice, volumes in 3D)"),
        "hu_window": Key(None, Nullable(ListOf(NUMBER, 2, what="a [center, width] pair of numbers")),
                         doc="CT window [center, width] for HU input (DICOM CT images and series) instead of "
                             "the file's VOI window; PNG/JPEG, already in [0, 1], pass unchanged"),
    },
    "augment": {
        "affine": Key(True, AnyOf(BOOL, PROBABILITY, what="true, false or a probability between 0 and 1"),
                      doc="random affine: true = every image, a number = that probability"),
        "shear": Key(0.2, Number(min=0), doc="affine shear"),
        "scale": Key([0.8, 1.2], PAIR, doc="affine zoom range"),
        "translate": Key(0.0, Number(min=0), doc="affine shift, fraction of the side"),
        "rotate": Key(0.0, Number(min=0), doc="affine rotation, degrees either way"),
        "hflip": Key(0.5, PROBABILITY, doc="horizontal flip probability"),
        "vflip": Key(0.0, PROBABILITY, doc="vertical (up-down) flip probability"),
        "blur": Key(0.0, PROBABILITY, doc="random Gaussian blur probability"),
        "blur_kernel": Key(7, Int(min=1), doc="Gaussian blur kernel size (odd)"),
        "blur_sigma": Key([0.05, 2.0], PAIR, doc="Gaussian blur sigma range"),
        "jpeg": Key(0.0, PROBABILITY, doc="random JPEG re-compression probability"),
        "brightness_contrast": Key(0.0, PROBABILITY, doc="random brightness/contrast probability"),
        "downscale": Key(0.0, PROBABILITY, doc="random down- and up-scaling probability"),
        "downscale_factor": Key([0.4, 1.0], PAIR, doc="downscaling factor range"),
    },
    "train": {
        "epochs": Key(20, Int(min=1)),
        "batch_size": Key(32, Int(min=1)),
        "lr": Key(1e-3, Number(above=0), doc="backbone learning rate"),
        "weight_decay": Key(1e-2, Number(min=0)),
        "warmup_epochs": Key(1, Number(min=0), doc="linear warm-up, in epochs"),
        "head_weights": Key({}, MapOf(NUMBER, what="a mapping of head names to numbers"),
                            doc="loss weight per head (1 for a head not named)"),
        "label_smoothing": Key(0.0, Number(min=0, below=1)),
        "seed": Key(0, INT),
        "patience": Key(10, Int(min=0), doc="early stopping, epochs without a better val AUC"),
        "num_workers": Key(0, Int(min=0)),
        "limit_per_split": Key(0, Int(min=0), doc="random images per split (0: all)"),
        "channels_last": Key(True, BOOL),
        "ensemble": Key(1, Int(min=1), doc="seed-ensemble members"),
        "freeze_stages": Key(0, Int(min=0), doc="backbone stem + stages kept frozen"),
        "optimizer": Key("adamw", STR, choices=("adamw", "adam", "sgd")),
        "schedule": Key("cosine", STR, choices=("cosine", "step"),
                        doc="cosine: warm-up then cosine to zero; step: lr times lr_step_gamma every lr_step_epochs"),
        "lr_step_epochs": Key(5, Int(min=1), doc="step schedule: epochs between decays"),
        "lr_step_gamma": Key(0.1, Number(above=0, max=1), doc="step schedule: decay factor"),
        "head_lr_factor": Key(10, Number(above=0), doc="heads learn at lr * this"),
        "monitor": Key("", STR, doc="the head whose validation score picks the best epoch (empty: the primary)"),
        "class_weights": Key("none", STR, choices=("none", "balanced"),
                             doc="balanced: loss weights inversely proportional to the training class frequencies"),
    },
    "data": {
        "cache": Key("memory", STR, choices=("memory", "disk", "none"), doc="where preprocessed images are kept"),
        "cache_dir": Key(None, Nullable(STR), doc="disk cache folder"),
    },
    "evaluate": {
        "tta": Key(True, BOOL, doc="average the image and its mirror"),
        "tta_scales": Key([1.0], ListOf(Number(above=0)), doc="test-time zooms"),
        "bootstrap": Key(1000, Int(min=0), doc="bootstrap resamples for the 95% CIs"),
    },
    "trainer": {
        "accelerator": Key("auto", STR),
        "devices": Key("auto", AnyOf(Literal("auto"), Int(min=1), ListOf(Int(min=0)),
                                     what="'auto', an integer >= 1 or a list of device indices")),
        "num_nodes": Key(1, Int(min=1)),
        "strategy": Key("auto", STR),
        "precision": Key("auto", AnyOf(Literal(*PRECISIONS), Literal(16, 32, 64),
                                       what="one of " + ", ".join(PRECISIONS) + " (or the integer 16, 32 or 64)")),
    },
    # `model` and `method` depend on the model (model_keys, method_keys).
}

TOP_KEYS = {
    "name": Key("experiment", STR),
    "dataset": Key("covid-ct", STR),
}
TOP_LEVEL = ("name", "dataset", "paper", "model", "preprocess", "augment", "train", "data", "method", "evaluate",
             "trainer", "stages")
# Sections a stage may override (chestdx.train.stages.STAGE_SECTIONS), and a stage's own keys.
STAGE_SECTIONS = ("train", "augment", "preprocess", "method", "evaluate", "data")
STAGE_KEYS = {
    "name": Key(type=STR, doc="required, unique; the stage's folder is stage<k>_<name>"),
    "freeze": Key([], ListOf(STR, what="a list of module-name prefixes (strings)"), doc="modules kept fixed"),
}
STAGE_SHARED = ("model", "dataset", "trainer", "stages")

# Keys that moved: an old config gets told where.
MOVED = {
    "magsd": "method",
    "train.lesion_weight": "train.head_weights.lesions",
    "train.negatives_lesion_free": "method.negatives_lesion_free",
}


def _defaults(keys: dict[str, Key]) -> dict:
    return {k: copy.deepcopy(key.default) for k, key in keys.items() if key.has_default}


DEFAULTS = {
    **_defaults(TOP_KEYS),
    "model": {**_defaults(MODEL_KEYS), **_defaults(MODEL_OPTION_DEFAULTS)},
    **{s: _defaults(SECTIONS[s]) for s in ("preprocess", "augment", "train", "data")},
    "method": {},
    **{s: _defaults(SECTIONS[s]) for s in ("evaluate", "trainer")},
    "stages": [],
}


def _inferred(default) -> Spec:
    """The type of a registry option, from its default (None: anything)."""
    if default is None:
        return ANY
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, int):
        return INT
    if isinstance(default, float):
        return NUMBER
    if isinstance(default, str):
        return STR
    if isinstance(default, (list, tuple)):
        if not default:
            return ListOf(ANY)
        kinds = {type(v) for v in default}
        item = _inferred(default[0]) if len(kinds) == 1 and default[0] is not None else ANY
        if kinds == {int, float} or kinds == {float}:
            item = NUMBER
        return ListOf(item)
    if isinstance(default, dict):
        return MapOf(ANY, what="a mapping")
    return ANY


def _plain(value):
    """Registry defaults as a YAML file would give them (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _entry(model_name: str):
    import chestdx.models  # noqa: F401  (registers every model and method)
    from chestdx.models.registry import get_entry

    return get_entry(model_name)


def model_keys(model_name: str) -> dict[str, Key]:
    """`model:` keys for a model: name, pretrained and exactly its builder's options."""
    from chestdx.models.backbones import backbone_names

    keys = dict(MODEL_KEYS)
    for option, default in _entry(model_name).options().items():
        key = MODEL_OPTION_DEFAULTS.get(option) or Key(_plain(default), _inferred(default))
        if option == "backbone":
            key = Key(key.default, key.type, tuple(backbone_names()), key.doc)
        keys[option] = key
    return keys


def method_keys(model_name: str) -> dict[str, Key]:
    """`method:` keys: exactly the options of the model's training method, defaults from there."""
    from chestdx.train.methods import get_method

    options = get_method(_entry(model_name).method).options
    return {k: Key(_plain(v), _inferred(v)) for k, v in options.items()}


def preprocess_keys(model_name: str) -> tuple[dict[str, Key], dict]:
    """`preprocess:` keys, and the defaults for this model (the schema's, updated by the
    preprocessing its paper prescribes). A prescribed key outside the schema is a key of its own."""
    keys = dict(SECTIONS["preprocess"])
    prescribed = _plain(_entry(model_name).preprocessing)
    for k, v in prescribed.items():
        if k not in keys:
            keys[k] = Key(v, _inferred(v), doc="prescribed by the model")
    defaults = {**_defaults(keys), **prescribed}
    return keys, {k: defaults[k] for k in keys if k in defaults}


# --------------------------------------------------------------------------------------------
# Validation.

def _suggest(name: str, candidates, prefix: str = "") -> str:
    name = str(name)
    moved = MOVED.get(prefix + name)
    if moved:
        return f" (moved: now {moved})"
    match = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
    if match:
        return f" (did you mean {prefix}{match[0]}?)"
    if not candidates:
        return " (this section takes no keys)"
    return f" (valid: {', '.join(map(str, candidates))})"


def _unknown(what: str, name, candidates, prefix: str = "", context: str = "") -> ChestDxError:
    return ChestDxError(f"config: unknown {what} {prefix}{name}{context}{_suggest(name, candidates, prefix)}")


def _mapping(value, path: str) -> dict:
    if value is None:  # `train:` with nothing under it
        return {}
    if not isinstance(value, dict):
        raise ChestDxError(f"config: {path} must be a mapping of keys to values, got {_show(value)}")
    return value


def check_section(value, keys: dict[str, Key], path: str, defaults: dict | None = None, context: str = "") -> dict:
    """Check one section's keys against `keys`. With `defaults`, fill in the missing ones (a
    complete section); without, return only what was given (a stage's partial section)."""
    value = _mapping(value, path)
    given = {}
    for k, v in value.items():
        if k not in keys:
            raise _unknown("key", k, list(keys), f"{path}.", context)
        given[k] = keys[k].check(v, f"{path}.{k}")
    if defaults is None:
        return given
    merged = {**copy.deepcopy(defaults), **given}
    return {k: merged[k] for k in keys if k in merged}


def _check_limit(train: dict, path: str = "train") -> None:
    limit, batch = int(train.get("limit_per_split") or 0), int(train["batch_size"])
    if 0 < limit < batch:
        raise ChestDxError(f"config: {path}.limit_per_split ({limit}) is below {path}.batch_size ({batch}): "
                           f"no full training batch (raise the limit, lower the batch size, or 0 for all images)")


def validate(raw: dict) -> dict:
    """The merged file + overrides, checked key by key, with every default filled in.
    Raises ChestDxError (one line, naming the key) on the first problem."""
    raw = _mapping(raw, "the config")
    for k in raw:
        if k not in TOP_LEVEL:
            raise _unknown("section" if isinstance(raw[k], dict) else "key", k, TOP_LEVEL)
    cfg = {k: key.check(raw[k], k) if k in raw else copy.deepcopy(key.default) for k, key in TOP_KEYS.items()}
    if "paper" in raw:
        cfg["paper"] = check_section(raw["paper"], SECTIONS["paper"], "paper")

    model = _mapping(raw.get("model"), "model")
    name = MODEL_KEYS["name"].check(model.get("name", MODEL_KEYS["name"].default), "model.name")
    mkeys = model_keys(name)  # an unknown model: the registry's error
    cfg["model"] = check_section(model, mkeys, "model", _defaults(mkeys), f" of model {name}")

    pkeys, pdefaults = preprocess_keys(name)
    cfg["preprocess"] = check_section(raw.get("preprocess"), pkeys, "preprocess", pdefaults)
    for section in ("augment", "train", "data"):
        cfg[section] = check_section(raw.get(section), SECTIONS[section], section, _defaults(SECTIONS[section]))
    xkeys = method_keys(name)
    method = _entry(name).method
    cfg["method"] = check_section(raw.get("method"), xkeys, "method", _defaults(xkeys),
                                  f" of training method {method} (model {name})")
    for section in ("evaluate", "trainer"):
        cfg[section] = check_section(raw.get(section), SECTIONS[section], section, _defaults(SECTIONS[section]))
    _check_limit(cfg["train"])

    section_keys = {**SECTIONS, "preprocess": pkeys, "method": xkeys}
    contexts = {"method": f" of training method {method} (model {name})"}
    cfg["stages"] = _check_stages(raw.get("stages", []), section_keys, cfg["train"], contexts)
    if "paper" in cfg:  # metadata last, as the files have it
        cfg["paper"] = cfg.pop("paper")
    return cfg


def _check_stages(stages, section_keys: dict, main_train: dict, contexts: dict) -> list[dict]:
    if stages is None:
        return []
    if not isinstance(stages, list):
        raise ChestDxError(f"config: stages must be a list of stages (mappings with a name), got {_show(stages)}")
    out, names = [], {}
    allowed = [*STAGE_KEYS, *STAGE_SECTIONS]
    for i, stage in enumerate(stages):
        path = f"stages[{i}]"
        stage = _mapping(stage, path)
        for k in stage:
            if k in STAGE_SHARED:
                raise ChestDxError(f"config: {path}.{k} cannot be set per stage: all stages share the model, "
                                   f"dataset and trainer (a stage may set {', '.join(allowed)})")
            if k not in allowed:
                raise _unknown("key", k, allowed, f"{path}.")
        if "name" not in stage:
            raise ChestDxError(f"config: {path}.name is missing: every stage needs a name")
        name = STAGE_KEYS["name"].check(stage["name"], f"{path}.name")
        if not name.strip() or "/" in name or "\\" in name:
            raise ChestDxError(f"config: {path}.name must be a non-empty name without '/' (it names the "
                               f"stage's folder), got {name!r}")
        if name in names:
            raise ChestDxError(f"config: {path}.name {name!r} repeats stages[{names[name]}].name: "
                               f"stage names must be unique")
        names[name] = i
        checked = {"name": name, "freeze": STAGE_KEYS["freeze"].check(stage.get("freeze", []) or [],
                                                                       f"{path}.freeze")}
        for section in STAGE_SECTIONS:
            if section in stage:
                checked[section] = check_section(stage[section], section_keys[section], f"{path}.{section}",
                                                 context=contexts.get(section, ""))
        if "train" in checked:
            _check_limit({**main_train, **checked["train"]}, f"{path}.train")
        out.append(checked)
    return out


def stage_list(cfg: dict) -> list[dict]:
    """A validated config's stages (name, freeze and the sections each overrides); [] for one stage."""
    return list(cfg.get("stages") or [])


# --------------------------------------------------------------------------------------------
# Reading and merging.

def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path=None, overrides=()) -> dict:
    """The config of a YAML file (optional) updated by `--set` overrides, validated, with every
    default filled in. Raises ChestDxError with one line on any problem."""
    raw = read_config_file(Path(path)) if path else {}
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def _numbers(node):
    if isinstance(node, dict):
        return {k: _numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v) for v in node]
    if isinstance(node, str) and _SCIENTIFIC.fullmatch(node.strip()):
        return float(node)
    return node


def _one_line(text) -> str:
    return " ".join(str(text).split())


def read_config_file(path: Path, _seen=()) -> dict:
    """One YAML file; `base: other.yaml` (relative to it) is read first and updated by the rest,
    so an ablation row states only what it changes. Sections named in `replace: [...]` take the
    place of the base's sections instead of updating them (another model, another paper row).
    Keys are checked later, by `validate`, on the merged result."""
    if not path.is_file():
        raise ChestDxError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ChestDxError(f"{path}: `base` refers back to itself")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ChestDxError(f"{path}: not valid YAML ({_one_line(err)})") from None
    if not isinstance(loaded, dict):
        raise ChestDxError(f"{path}: a config file must be a mapping of sections, got {type(loaded).__name__}")
    base, replace = loaded.pop("base", None), loaded.pop("replace", None) or []
    if replace and not base:
        raise ChestDxError(f"config: {path}: `replace` needs a `base` whose sections it replaces")
    if not isinstance(replace, list) or not all(isinstance(s, str) for s in replace):
        raise ChestDxError(f"config: {path}: replace must be a list of section names, got {_show(replace)}")
    for section in replace:
        if section not in TOP_LEVEL:
            raise ChestDxError(f"config: {path}: replace names an unknown section {section}"
                               f"{_suggest(section, TOP_LEVEL)}")
    if base:
        if not isinstance(base, str):
            raise ChestDxError(f"config: {path}: base must be a file name, got {_show(base)}")
        inherited = read_config_file(path.parent / base, (*_seen, path.resolve()))
        for section in replace:
            inherited.pop(section, None)
        loaded = deep_merge(inherited, loaded)
    return loaded


_INDEXED = re.compile(r"(?P<key>[^\[\]]+)(?P<index>(\[\d+\])*)")


def _override_path(key: str) -> list:
    """`a.b`, `stages[0].train.lr` or `stages.0.train.lr` -> ['a', 'b'] / ['stages', 0, 'train', 'lr']."""
    parts = []
    for piece in key.split("."):
        match = _INDEXED.fullmatch(piece.strip())
        if not match:
            return []
        name = match["key"]
        parts.append(int(name) if name.isdigit() else name)
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match["index"])]
    return parts


def apply_override(cfg: dict, item: str) -> None:
    """`a.b=value`, the value parsed as YAML (numbers, booleans, lists); `stages[0].train.lr=...`
    (or `stages.0.train.lr=...`) reaches into a list."""
    if "=" not in item:
        raise ChestDxError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    parts = _override_path(key.strip())
    if not parts or isinstance(parts[0], int):
        raise ChestDxError(f"override {item!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ChestDxError(f"override {item!r}: the value is not valid YAML ({_one_line(err)})") from None
    node, where = cfg, ""
    for part, following in zip(parts[:-1], parts[1:]):
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ChestDxError(f"override {item!r}: {where} does not exist "
                                   f"({len(node) if isinstance(node, list) else 0} item(s) there)")
            node = node[part]
        else:
            if node.get(part) is None:
                node[part] = [] if isinstance(following, int) else {}
            node = node[part]
        if not isinstance(node, (dict, list)) or (isinstance(node, list) and not isinstance(following, int)):
            raise ChestDxError(f"override {item!r}: {where} is not a section")
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ChestDxError(f"override {item!r}: item {last} does not exist")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ChestDxError(f"override {item!r}: {where} is not a section")
