"""Export a model bundle to ONNX for fast inference, with its metadata in a JSON file beside it.

`model.onnx` takes the preprocessed sample (B, C, *spatial: an image, a volume or a slice
sequence, as the bundle's sample kind says) and returns the raw output of each head (e.g.
`logits` and `lesion_logits` for LA-DNN); `model.json` carries everything else a user of the
model needs (heads, preprocessing, operating thresholds, validation metrics), so an ONNX model
can be served without PyTorch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from chestdx.errors import ChestDxError
from chestdx.models.bundle import load_bundle
from chestdx.tasks import heads_from
from chestdx.utils import atomic_path, write_json_atomic

METADATA_KEYS = ("registry_name", "model_kwargs", "heads", "primary", "classes", "sample", "spatial_dims", "modality",
                 "preprocess", "tta", "tta_scales", "thresholds", "validation", "data_fingerprint", "best_epoch")
ONNX_FORMAT = "chestdx-onnx-v2"


class _Outputs(torch.nn.Module):
    """The model's dict of outputs as the tuple ONNX needs."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x):
        out = self.model(x)
        return tuple(out[name] for name in self.names)


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


def export_onnx(bundle_path, out_path=None, opset: int = 17) -> Path:
    """Write `<out>.onnx` and `<out>.json`; returns the ONNX path. Dynamic batch size."""
    model, bundle = load_bundle(bundle_path)
    out_path = Path(out_path) if out_path else Path(bundle_path).with_suffix(".onnx")
    shape = input_shape(bundle)
    names = [h.output for h in heads_from(bundle)]
    wrapper = _Outputs(model, names).eval()
    example = torch.zeros(*shape)
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        # The TorchScript exporter takes seconds where the dynamo one takes tens of seconds here.
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=["image"], output_names=names,
                          dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=opset, dynamo=False)
    meta = {"format": ONNX_FORMAT, "outputs": names, "input": {"name": "image", "shape": [None, *shape[1:]]},
            **{k: bundle[k] for k in METADATA_KEYS if k in bundle}, "source": Path(bundle_path).name}
    write_json_atomic(metadata_path(out_path), meta)
    return out_path


class OnnxModel:
    """An ONNX Runtime session that answers like a chestdx model: x -> dict of tensors."""

    def __init__(self, onnx_path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ChestDxError(f"{onnx_path}: not a loadable ONNX model ({err})") from None
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: torch.Tensor) -> dict:
        outputs = self.session.run(None, {"image": np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return {name: torch.from_numpy(value) for name, value in zip(self.names, outputs)}

    def eval(self):
        return self


def load_onnx(onnx_path) -> tuple[OnnxModel, dict]:
    meta_file = metadata_path(onnx_path)
    if not meta_file.is_file():
        raise ChestDxError(f"{onnx_path}: metadata {meta_file.name} missing; export with `chestdx export`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != ONNX_FORMAT:
        raise ChestDxError(f"{meta_file}: not chestdx ONNX metadata (expected format {ONNX_FORMAT})")
    return OnnxModel(onnx_path), meta
