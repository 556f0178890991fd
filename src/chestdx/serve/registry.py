"""The models a service offers, loaded once at start-up from a folder and never changed after.

Every `*.pt` bundle and `*.onnx` export in the folder becomes one model named after its file.
Inference runs through ONNX Runtime: an `.onnx` beside a bundle is used, a bundle without one
is exported into a cache at start-up; PyTorch is the fallback when export fails. Heat maps of a
GAP + linear head (CAM, Grad-CAM, Grad-CAM++) come in closed form from the ONNX graph's feature
maps (`chestdx.explain.closed_form`), with no backward pass and no lock; any other head's come
from the PyTorch bundle, one at a time.

A volume model (bundle sample "volume", e.g. the dual-sampling attention network) takes a whole
series; its heat map is the model's own attention over the volume, shown as a montage of slices.
`ServedModel.warm_up` times its forward pass on a zero volume at start-up: the service answers a
volume synchronously only when that is fast enough (`chestdx.serve.jobs`), otherwise as a job.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chestdx.errors import ChestDxError
from chestdx.inference import Predictor

log = logging.getLogger("chestdx.serve")

INTENDED_USE = ("Research use only, not for diagnosis. Estimates the probabilities of {classes} (and, "
                "where the model has a lesion head, of five CT lesion types) from one {what} of an adult "
                "chest; trained on public data whose sources are confounded with the label.")


@dataclass
class ServedModel:
    name: str
    predictor: Predictor  # ONNX Runtime where possible
    explainer: Predictor | None  # PyTorch bundle for heat maps, if available
    files: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # CAM hooks are not thread-safe
    warmup_s: float | None = None  # a volume model's timed forward pass on a zero volume (`warm_up`)
    has_attention: bool = False  # a volume model that outputs its attention map (the montage's heat)

    @property
    def sample(self) -> str:
        return self.predictor.sample

    def warm_up(self, limit_s: float | None = None) -> float | None:
        """Time the calls `Predictor.predict_volume` makes on a zero volume of the model's input size:
        two passes, the second (warm) one counted; one pass only when the first already exceeds
        `limit_s`. Volume models only (None otherwise, or when the pass fails: then every volume goes
        to a job)."""
        if self.sample != "volume":
            return None
        import torch

        from chestdx.export import input_shape

        x = torch.zeros(input_shape(self.predictor.bundle))

        def once() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                out = self.predictor.model(x)
            if self.predictor.tta:
                self.predictor.predict_tensor(x)
            self.has_attention = "attention" in out
            return time.perf_counter() - started

        try:
            seconds = once()
            if limit_s is None or seconds <= limit_s:
                seconds = once()
        except Exception as err:  # a model that cannot run a zero volume: no estimate, jobs only
            log.warning("%s: warm-up pass failed (%s); volumes go to jobs", self.name, err)
            return None
        self.warmup_s = seconds
        log.info("%s: warm-up pass %.3f s", self.name, seconds)
        return seconds

    def closed_form(self, method: str) -> bool:
        from chestdx.explain.closed_form import CLOSED_FORM_METHODS

        return method in CLOSED_FORM_METHODS and getattr(self.predictor.model, "cam_spec", None) is not None

    def heatmaps(self, method: str) -> bool:
        if self.sample == "volume":
            return self.has_attention
        return self.closed_form(method) or self.explainer is not None

    def heatmap_backend(self, method: str) -> str:
        if self.sample == "volume":
            return "the model's own attention map (a montage of slices)"
        return "closed form from the ONNX features" if self.closed_form(method) else "pytorch backward pass"

    def heatmap_target(self, prediction):
        """The verdict's class (at the operating threshold, not the argmax) where it names one score column."""
        from chestdx.explain.core import column_names

        names = [n.lower() for n in column_names(self.predictor.explain_heads)]
        return prediction if isinstance(prediction, str) and prediction.lower() in names else "predicted"

    def heatmap(self, x, method: str, target="predicted", outputs: dict | None = None):
        """One image's (H, W) heat map in [0, 1] for `target`; `outputs`: the ONNX pass that predicted it,
        feature maps included (closed form only), so no second pass is needed."""
        if self.closed_form(method):
            if outputs is None:
                return self.predictor.model.explain(x, method, target).maps[0, 0]
            from chestdx.explain.closed_form import explain_outputs

            return explain_outputs(outputs, self.predictor.model.cam_spec, method, target,
                                   input_hw=x.shape[2:]).maps[0, 0]
        from chestdx.explain import explain

        with self.lock:
            return explain(self.explainer.model, x, method, target, self.explainer.explain_heads).maps[0, 0]

    def card(self, heatmap_method: str = "gradcam++", max_sync_seconds: float | None = None) -> dict:
        """`input`: "image" or "series" (one upload of a whole series: sequence and volume models);
        `sample`: the model's own kind (image, sequence, volume); for a volume model `answers`:
        "synchronously" or "job" (`/predict` answers 202 with a job, see `chestdx.serve.jobs`)."""
        b = self.predictor.bundle
        card = {
            "name": self.name,
            "architecture": b.get("registry_name"),
            "backbone": b.get("model_kwargs", {}).get("backbone"),
            "modality": b.get("modality"),
            "task": self.predictor.primary.task,
            "classes": list(self.predictor.primary.labels),
            "lesions": [label for h in self.predictor.heads if h.name == "lesions" for label in h.labels],
            "heads": [{"name": h.name, "task": h.task, "labels": list(h.labels),
                       "thresholds": self.predictor.thresholds[h.name]} for h in self.predictor.heads],
            "threshold": self.predictor.threshold,
            "input_size": b.get("preprocess", {}).get("size"),
            "metrics": {"validation": {k: v for k, v in b.get("validation", {}).items() if k != "thresholds"}},
            "intended_use": INTENDED_USE.format(what=self._input_kind(), classes=" / ".join(b.get("classes") or [])),
            "input": "series" if self.predictor.takes_series else "image",
            "sample": self.sample,
            "backend": self.predictor.backend,
            "heatmaps": self.heatmaps(heatmap_method),
            "heatmap_method": heatmap_method,
            "heatmap_backend": self.heatmap_backend(heatmap_method) if self.heatmaps(heatmap_method) else None,
        }
        if self.sample == "volume":
            from chestdx.serve.jobs import sync_allowed

            card["heatmap_method"] = "attention" if self.has_attention else None
            card["warmup_ms"] = None if self.warmup_s is None else round(self.warmup_s * 1000, 2)
            card["answers"] = ("synchronously" if max_sync_seconds is not None
                               and sync_allowed(self.warmup_s, max_sync_seconds) else "job")
        return card

    def _input_kind(self) -> str:
        modality = self.predictor.bundle.get("modality", "chest")
        if self.predictor.sample == "sequence":
            n = self.predictor.bundle.get("preprocess", {}).get("sequence_length", 16)
            return f"{modality} series ({n} evenly spaced slices; a zip of its files or a NIfTI file)"
        if self.predictor.sample == "volume":
            return f"{modality} volume (one whole series: a zip of its DICOM or slice image files, or a NIfTI file)"
        return f"{modality} image"


def load_models(folder, cache_dir, onnx_threads: int | None = 1) -> dict[str, ServedModel]:
    """`onnx_threads`: per request; concurrent requests share the cores, so one each is fastest under load.
    A request is one image (or one series): the ONNX graphs are specialised to a batch of one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ChestDxError(f"{folder}: models folder not found")
    models: dict[str, ServedModel] = {}
    for bundle in sorted(folder.glob("*.pt")):
        onnx = bundle.with_suffix(".onnx")
        torch_predictor = Predictor(bundle)
        predictor = (Predictor(onnx, onnx_threads, batch=1) if onnx.exists()
                     else _exported(bundle, Path(cache_dir), onnx_threads) or torch_predictor)
        models[bundle.stem] = ServedModel(bundle.stem, predictor, torch_predictor, [bundle.name])
    from chestdx.export import part_files

    parts = {name for meta in folder.glob("*.json") for name in part_files(meta)}  # later graphs of a model in parts
    for onnx in sorted(folder.glob("*.onnx")):
        if onnx.stem not in models and onnx.name not in parts:
            models[onnx.stem] = ServedModel(onnx.stem, Predictor(onnx, onnx_threads, batch=1), None, [onnx.name])
    if not models:
        raise ChestDxError(f"{folder}: no models (*.pt bundles or *.onnx exports) found")
    return models


def _exported(bundle: Path, cache_dir: Path, threads: int | None) -> Predictor | None:
    from chestdx.export import export_onnx

    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()[:16]
    target = cache_dir / f"{bundle.stem}-{digest}.onnx"
    try:
        if not target.exists():
            export_onnx(bundle, target)
        return Predictor(target, threads, batch=1)
    except Exception as err:  # any exporter failure: serve with PyTorch rather than not at all
        log.warning("%s: ONNX export failed (%s); serving with PyTorch", bundle.name, err)
        return None
