"""Export a model bundle to ONNX for fast inference, with its metadata in a JSON file beside it.

`model.onnx` takes the preprocessed sample (B, C, *spatial: an image, a volume or a slice
sequence, as the bundle's sample kind says) and returns the raw output of each head (e.g.
`logits` and `lesion_logits` for LA-DNN); `model.json` carries everything else a user of the
model needs (heads, preprocessing, operating thresholds, validation metrics), so an ONNX model
can be served without the model's Python code.

A model with a step that is no tensor op (AG-CNN's connected components) declares
`export_parts()`: its graphs in order and the dotted name of the NumPy step between them. Then
`model.onnx` is the first graph, `model.<part>.onnx` the next ones, and `model.json` lists them.

A model whose explained scores are global average pooling + linear on (a pointwise map of) its CAM
target layer (`chestdx.explain.closed_form`) also outputs that layer's feature maps
(`cam_features`, or `cam_features_<m>` per ensemble member), and `model.cam.npz` beside it holds
the head weights (`model.json`'s `cam` entry describes them): CAM, Grad-CAM and Grad-CAM++ then
follow from one ONNX pass with a few NumPy operations (`OnnxModel.explain`), no PyTorch model.
The feature outputs are returned only on request (`OnnxModel(x, features=True)`).
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chestdx.errors import ChestDxError
from chestdx.models.bundle import load_bundle
from chestdx.tasks import heads_from
from chestdx.utils import atomic_path, write_json_atomic

log = logging.getLogger("chestdx.export")

METADATA_KEYS = ("registry_name", "model_kwargs", "heads", "primary", "classes", "sample", "spatial_dims", "modality",
                 "preprocess", "tta", "tta_scales", "thresholds", "validation", "data_fingerprint", "best_epoch",
                 "input_reference", "calibration")
ONNX_FORMAT = "chestdx-onnx-v2"


class _Outputs(torch.nn.Module):
    """The model's dict of outputs as the tuple ONNX needs, then the outputs of `layers` (the CAM
    target layers' feature maps), each captured by a forward hook."""

    def __init__(self, model, names, layers=()):
        super().__init__()
        self.model, self.names, self.layers = model, names, list(layers)

    def forward(self, x):
        captured = [None] * len(self.layers)

        def keep(k):
            def hook(module, inputs, output):
                captured[k] = output
            return hook

        handles = [layer.register_forward_hook(keep(k)) for k, layer in enumerate(self.layers)]
        try:
            out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return tuple(out[name] for name in self.names) + tuple(captured)


@dataclass(frozen=True)
class ExportPart:
    """One graph of a model exported in parts: `module(*inputs)` returns the tuple `outputs`."""

    name: str
    module: torch.nn.Module
    inputs: tuple
    outputs: tuple


def input_shape(bundle: dict) -> list[int]:
    """(1, C, *spatial) of the bundle's preprocessed sample: C = the slices of a sequence, else the
    preprocessing's channels; each spatial side the preprocessing's size."""
    pre = bundle["preprocess"]
    dims = int(bundle.get("spatial_dims", 2))
    size = pre.get("size", 224)
    spatial = list(size) if isinstance(size, (list, tuple)) else [int(size)] * dims
    channels = int(pre.get("sequence_length", 16)) if bundle.get("sample") == "sequence" else int(pre.get("channels", 1))
    return [1, channels, *spatial]


def metadata_path(onnx_path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def cam_weights_path(onnx_path) -> Path:
    """`<out>.cam.npz`: the closed-form CAM's head weights beside `<out>.onnx`."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.cam.npz")


def export_onnx(bundle_path, out_path=None, opset: int = 17, with_features: bool | None = None) -> Path:
    """Write `<out>.onnx` and `<out>.json` (and `<out>.<part>.onnx` for a model in parts); returns the
    ONNX path. Dynamic batch size.

    with_features: also output the CAM target layers' feature maps and write `<out>.cam.npz`, for
    closed-form heat maps. None (the default): whenever the model's heads allow it
    (`chestdx.explain.closed_form.closed_form_spec`); True: fail if they do not; False: never."""
    from chestdx.explain.closed_form import closed_form_check, save_spec, target_layers
    from chestdx.explain.core import ordered_heads

    model, bundle = load_bundle(bundle_path)
    out_path = Path(out_path) if out_path else Path(bundle_path).with_suffix(".onnx")
    shape = input_shape(bundle)
    example = torch.zeros(*shape)
    meta = {"format": ONNX_FORMAT, "input": {"name": "image", "shape": [None, *shape[1:]]},
            **{k: bundle[k] for k in METADATA_KEYS if k in bundle}, "source": Path(bundle_path).name,
            "source_sha256": file_sha256(bundle_path)}
    spec, why = None, "a model exported in parts"
    if with_features is not False and not hasattr(model, "export_parts"):
        heads = ordered_heads(heads_from(bundle), bundle.get("primary"))  # the explainer's score columns
        spec, why = closed_form_check(model, heads)
    if with_features and spec is None:
        raise ChestDxError(f"{bundle_path}: no closed-form CAM for this model ({why})")
    if hasattr(model, "export_parts"):
        parts, between = model.export_parts()
        meta.update(_export_parts(parts, between, example, out_path, bundle, opset))
    else:
        names = [h.output for h in heads_from(bundle)] + list(getattr(model, "export_outputs", ()))
        features = [m["feature"] for m in spec["members"]] if spec else []
        layers = target_layers(model) if spec else []
        _export_graph(_Outputs(model, names, layers).eval(), (example,), ("image",), names + features, out_path,
                      opset)
        meta["outputs"] = names
        if spec:
            spec["input_hw"] = list(shape[2:])
            meta["cam"] = {"features": features, "methods": ["cam", "gradcam", "gradcam++"],
                           **save_spec(spec, cam_weights_path(out_path))}
    write_json_atomic(metadata_path(out_path), meta)
    return out_path


def _export_graph(module, example: tuple, inputs, outputs, path: Path, opset: int) -> None:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        # The TorchScript exporter takes seconds where the dynamo one takes tens of seconds here.
        torch.onnx.export(module.eval(), example, str(tmp), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={n: {0: "batch"} for n in (*inputs, *outputs)}, opset_version=opset,
                          dynamo=False)


def _export_parts(parts, between: str, example, out_path: Path, bundle: dict, opset: int) -> dict:
    """Each part traced on the outputs of the ones before it (and of the step between them)."""
    step = _between_step(between)
    values = {"image": example}
    graphs = []
    for k, part in enumerate(parts):
        if k:
            values.update({n: torch.from_numpy(v) for n, v in
                           step({n: v.numpy() for n, v in values.items()}, bundle.get("model_kwargs", {})).items()})
        path = out_path if k == 0 else out_path.with_name(f"{out_path.stem}.{part.name}.onnx")
        inputs = tuple(values[n] for n in part.inputs)
        with torch.no_grad():
            values.update(zip(part.outputs, part.module.eval()(*inputs)))
        _export_graph(part.module, inputs, part.inputs, part.outputs, path, opset)
        graphs.append({"file": path.name, "inputs": list(part.inputs), "outputs": list(part.outputs)})
    return {"graphs": graphs, "between": between, "outputs": [n for g in graphs for n in g["outputs"]]}


def _between_step(name: str):
    module, _, function = name.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise ChestDxError(f"ONNX metadata names the step {name!r}, which cannot be loaded ({err})") from None


class OnnxModel:
    """ONNX Runtime sessions that answer like a chestdx model: x -> dict of tensors. A model exported
    in parts runs its graphs in order with the NumPy step between them (its boxes are outputs too).

    An export with closed-form CAM (metadata `cam`) has `cam_spec` (else None): `model(x, features=True)`
    adds the feature maps to the dict, `model.explain(x, method, target)` gives the heat maps.

    `batch`: the batch size most calls use (a service: 1). Its sessions have the batch dimension
    fixed, so ONNX Runtime folds the shape arithmetic of "same" padding into the convolutions (an
    EfficientNet-lite graph: 269 nodes to 56, 16.8 to 14.4 ms at one image on one thread, 13.1 to 9.3 ms
    per image at 32 on two; batches of 4 cost the same per image); another batch size gets sessions
    with the dynamic batch, built when first needed."""

    def __init__(self, onnx_path, threads: int | None = None, meta: dict | None = None, batch: int | None = None):
        meta = meta or {}
        self.onnx_path = Path(onnx_path)
        self.threads = threads
        self.graphs = meta.get("graphs") or [{"file": self.onnx_path.name, "inputs": ["image"], "outputs": None}]
        self.batch = batch
        self._by_batch = {batch: self._sessions(batch)}
        self._building = threading.Lock()
        self.sessions = self._by_batch[batch]
        self.feature_names = list((meta.get("cam") or {}).get("features", []))
        self.names = [n for _, _, outputs in self.sessions for n in outputs if n not in self.feature_names]
        self.step = _between_step(meta["between"]) if meta.get("between") else None
        self.model_kwargs = meta.get("model_kwargs", {})
        self.cam_spec = _load_cam_spec(meta, self.onnx_path)

    def _sessions(self, batch: int | None) -> list:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:  # a service runs many requests at once: one thread each, and no spinning while idle
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if batch is not None:
            options.add_free_dimension_override_by_name("batch", batch)  # the export's dynamic axis
        sessions = []
        for k, graph in enumerate(self.graphs):
            path = self.onnx_path if k == 0 else self.onnx_path.with_name(graph["file"])
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as err:
                raise ChestDxError(f"{path}: not a loadable ONNX model ({err})") from None
            sessions.append((session, graph["inputs"], [o.name for o in session.get_outputs()]))
        return sessions

    def _sessions_for(self, batch: int) -> list:
        if self.batch is None:
            return self.sessions
        key = batch if batch == self.batch else None
        if key not in self._by_batch:
            with self._building:
                if key not in self._by_batch:
                    self._by_batch[key] = self._sessions(None)
        return self._by_batch[key]

    def __call__(self, x: torch.Tensor, features: bool = False) -> dict:
        """Each output by name; `features`: also the CAM target layers' feature maps (if exported)."""
        image = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        n = len(image)
        padded = bool(self.batch) and self.batch // 2 < n < self.batch
        if padded:
            # a folder's last, partial batch: zero rows up to the fixed size (each row is predicted on
            # its own). The dynamic graphs are 40% slower per image at 32, and their first call builds
            # sessions and plans memory: on 120 images, padding 24 -> 32 gave 18-23 images/s, not 14
            image = np.concatenate([image, np.zeros((self.batch - n, *image.shape[1:]), np.float32)])
        values = {"image": image}
        for k, (session, inputs, outputs) in enumerate(self._sessions_for(len(image))):
            if k:
                values.update(self.step(values, self.model_kwargs))
            wanted = [name for name in outputs if features or name not in self.feature_names]
            values.update(zip(wanted, session.run(wanted, {name: values[name] for name in inputs})))
        # every output is batch-first (the export's dynamic axis 0): the padding rows are dropped
        return {name: torch.from_numpy(np.asarray(value)[:n] if padded else np.asarray(value))
                for name, value in values.items() if name != "image"}

    def explain(self, x: torch.Tensor, method: str = "gradcam++", target="predicted"):
        """`chestdx.explain.explain`'s answer (an `Explanation`) in closed form from one ONNX pass."""
        from chestdx.explain.closed_form import explain_outputs

        if self.cam_spec is None:
            raise ChestDxError("this ONNX export has no closed-form CAM; explain the PyTorch bundle")
        return explain_outputs(self(x, features=True), self.cam_spec, method, target, input_hw=x.shape[2:])

    def eval(self):
        return self


def _load_cam_spec(meta: dict, onnx_path: Path) -> dict | None:
    """The closed-form CAM spec of an export, None without one (or with its weights file missing or
    changed: then heat maps need the PyTorch bundle, and predictions are unaffected)."""
    if not meta.get("cam"):
        return None
    from chestdx.explain.closed_form import load_spec

    try:
        return load_spec({k: v for k, v in meta["cam"].items() if k not in ("features", "methods")},
                         Path(onnx_path).parent)
    except (ChestDxError, OSError, ValueError, KeyError) as err:
        log.warning("%s: closed-form CAM unavailable (%s)", onnx_path, err)
        return None


def file_sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_export(bundle_path) -> Path | None:
    """`<bundle>.onnx` when it was exported from this very bundle file (its metadata records the
    bundle's SHA-256), else None: a stale export must never answer for a retrained model."""
    bundle_path = Path(bundle_path)
    onnx_path = bundle_path.with_suffix(".onnx")
    try:
        meta = json.loads(metadata_path(onnx_path).read_text())
    except (OSError, ValueError):
        return None
    if not onnx_path.is_file() or not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        return None
    return onnx_path if meta.get("source_sha256") == file_sha256(bundle_path) else None


def load_onnx(onnx_path, threads: int | None = None, batch: int | None = None) -> tuple[OnnxModel, dict]:
    """The exported model and its metadata; `threads`, `batch`: as `OnnxModel` takes them."""
    meta_file = metadata_path(onnx_path)
    if not meta_file.is_file():
        raise ChestDxError(f"{onnx_path}: metadata {meta_file.name} missing; export with `chestdx export`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != ONNX_FORMAT:
        raise ChestDxError(f"{meta_file}: not chestdx ONNX metadata (expected format {ONNX_FORMAT})")
    if batch and meta.get("sample", "image") != "image":
        batch = 1  # a series or volume model takes one sample per call, whatever the image batch size
    return OnnxModel(onnx_path, threads=threads, meta=meta, batch=batch), meta


def part_files(meta_file) -> list[str]:
    """The graph files after the first that an export's metadata lists (not models of their own)."""
    try:
        meta = json.loads(Path(meta_file).read_text())
    except (OSError, ValueError):
        return []
    return [g["file"] for g in (meta.get("graphs") or [])[1:]] if isinstance(meta, dict) else []
