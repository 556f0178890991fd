"""Inference with a model bundle: files or arrays in, class and lesion probabilities out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chestdx.data.io import read_image
from chestdx.data.transforms import build_pipeline, tta_views
from chestdx.errors import InputError
from chestdx.models.bundle import load_bundle
from chestdx.train.module import class_probabilities

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}


class Predictor:
    """A model bundle (.pt, PyTorch) or an exported model (.onnx + .json, ONNX Runtime)."""

    def __init__(self, bundle_path):
        self.path = Path(bundle_path)
        if self.path.suffix == ".onnx":
            from chestdx.export import load_onnx

            self.model, self.bundle = load_onnx(self.path)
            self.backend = "onnxruntime"
        else:
            self.model, self.bundle = load_bundle(bundle_path)
            self.backend = "pytorch"
        self.load_steps, self.sample_steps = build_pipeline(self.bundle["preprocess"], train=False)
        self.threshold = float(self.bundle.get("threshold", 0.5))
        self.tta = bool(self.bundle.get("tta", False))
        self.tta_scales = [float(s) for s in self.bundle.get("tta_scales", [1.0])]

    def prepare(self, gray: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(the image on the model's grid in [0, 1], for overlays; the model input (1, 1, H, W))."""
        shown = self.load_steps(gray)
        return shown, torch.from_numpy(np.ascontiguousarray(self.sample_steps(shown)))[None, None]

    def preprocess(self, gray: np.ndarray) -> torch.Tensor:
        return self.prepare(gray)[1]

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor) -> dict:
        """x: (B, 1, H, W), preprocessed. Returns numpy probabilities: `probability` (B,) of the positive
        class for a binary model, (B, K) over the classes otherwise; `lesions` (B, 5) for LA-DNN."""
        covid, lesions = [], []
        for view in tta_views(x, self.tta, self.tta_scales):
            out = self.model(view)
            covid.append(class_probabilities(out["logits"]))
            if "lesion_logits" in out:
                lesions.append(torch.sigmoid(out["lesion_logits"]))
        result = {"probability": torch.stack(covid).mean(0).numpy()}
        if lesions:
            result["lesions"] = torch.stack(lesions).mean(0).numpy()
        return result

    def predict_source(self, source, name: str | None = None) -> dict:
        image = read_image(source, name=name)
        if image.meta.get("frames", 1) > 1:
            raise InputError(name or source, f"{image.meta['frames']}-frame DICOM given to a 2D model; send one slice")
        out = self.predict_tensor(self.preprocess(image.to_gray()))
        return self.describe(out["probability"][0], out.get("lesions", [None])[0])

    @property
    def multiclass(self) -> bool:
        return len(self.bundle["classes"]) > 2

    def describe(self, p, lesions=None) -> dict:
        """p: the positive-class probability (binary) or the class probability vector."""
        classes = self.bundle["classes"]
        if self.multiclass:
            probs = {name: float(v) for name, v in zip(classes, np.asarray(p))}
            return {"probabilities": probs, "prediction": max(probs, key=probs.get), "threshold": None}
        p = float(p)
        result = {
            "probabilities": {classes[0]: 1 - p, classes[1]: p},
            "prediction": classes[1] if p >= self.threshold else classes[0],
            "threshold": self.threshold,
        }
        if lesions is not None:
            result["lesions"] = {name: float(v) for name, v in zip(self.bundle["lesions"], lesions)}
        return result


def expand_inputs(inputs) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (sorted)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files
