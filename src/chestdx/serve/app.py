"""The online diagnostic service: REST API (versioned, OpenAPI at /docs) and a web page, one process.

The process holds only read-only models; every result goes to the database, so copies of the
service can run side by side behind a load balancer. Bad input never reaches a traceback: it
gets a 4xx with a JSON body `{"error": {"status", "message", "file"}}`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from chestdx.data.io import decode_image
from chestdx.errors import InputError
from chestdx.explain import explain
from chestdx.explain.render import draw_box, overlay_rgb
from chestdx.serve.db import Database
from chestdx.serve.deid import deidentify_dicom
from chestdx.serve.registry import ServedModel, load_models
from chestdx.serve.series import is_series_upload, unpacked_series

log = logging.getLogger("chestdx.serve")
API = "/api/v1"


@dataclass
class ServiceSettings:
    models_dir: Path
    db_url: str
    cache_dir: Path
    store_images: bool = False
    max_upload_mb: float = 50.0
    max_pixels: int = 50_000_000
    heatmap_method: str = "gradcam++"

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ServiceError(Exception):
    def __init__(self, status: int, message: str, file: str | None = None):
        self.status, self.message, self.file = status, message, file


def _input_status(err: InputError) -> int:
    """413 for size limits, 415 for what is not an image at all, 422 for damaged images."""
    reason = err.reason
    if "too large" in reason:
        return 413
    if reason.startswith("not a supported image"):
        return 415
    return 400 if reason.startswith("empty file") else 422


def create_app(settings: ServiceSettings) -> FastAPI:
    models = load_models(settings.models_dir, settings.cache_dir)
    db = Database(settings.db_url)
    default_model = sorted(models)[0]
    app = FastAPI(title="chestdx", version="1", description="Attention-guided diagnosis of chest CT and X-ray "
                  "images. Research use only, not for diagnosis.")
    app.state.models, app.state.db, app.state.settings = models, db, settings

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError):
        return JSONResponse({"error": {"status": exc.status, "message": exc.message, "file": exc.file}}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": {"status": 422, "message": problems, "file": None}}, 422)

    def pick(name: Optional[str]) -> ServedModel:
        name = name or default_model
        if name not in models:
            raise ServiceError(404, f"unknown model {name!r}; available: {', '.join(sorted(models))}")
        return models[name]

    def read_upload(upload: UploadFile) -> bytes:
        data = upload.file.read(settings.max_bytes + 1)
        if len(data) > settings.max_bytes:
            raise ServiceError(413, f"file is larger than the {settings.max_upload_mb:g} MB limit", upload.filename)
        return data

    def run_one(served: ServedModel, upload: UploadFile, heatmap: bool) -> dict:
        name = upload.filename or "upload"
        started = time.perf_counter()
        data = read_upload(upload)
        if served.predictor.sample == "sequence":
            return run_series(served, data, name, heatmap, started)
        try:
            image = decode_image(data, name, max_pixels=settings.max_pixels, hu_window=served.predictor.hu_window)
        except InputError as err:
            raise ServiceError(_input_status(err), err.reason, name) from None
        if image.meta.get("frames", 1) > 1:
            raise ServiceError(422, f"{image.meta['frames']}-frame DICOM; send one slice", name)
        t_decode = time.perf_counter()
        predictor = served.predictor
        shown, x = predictor.prepare(image.to_gray())
        t_pre = time.perf_counter()
        out, boxes = predictor.predict_tensor(x, with_boxes=True)
        verdict = predictor.describe({name: p[0] for name, p in out.items()})
        t_inf = time.perf_counter()
        result = {"model": served.name, **verdict}
        crop = None
        if boxes is not None:  # the model's own crop (AG-CNN's local branch input), on the model's grid
            crop = [float(v) for v in boxes[0]]
            result["crop_box"] = {"x0": crop[0], "y0": crop[1], "x1": crop[2], "y1": crop[3],
                                  "grid": list(shown.shape[:2])}
        if heatmap and served.explainer is not None:
            with served.lock:
                heat = explain(served.explainer.model, x, settings.heatmap_method, "predicted",
                               served.explainer.explain_heads).maps[0, 0]
            result["heatmap"] = {"method": settings.heatmap_method, "target": _as_text(verdict["prediction"]),
                                 **_heatmap_pngs(shown, heat, crop)}
        t_heat = time.perf_counter()
        result["timings_ms"] = {k: round(v * 1000, 2) for k, v in (
            ("decode", t_decode - started), ("preprocess", t_pre - t_decode), ("inference", t_inf - t_pre),
            ("heatmap", t_heat - t_inf), ("total", t_heat - started))}
        result["backend"] = predictor.backend
        meta = {k: image.meta.get(k) for k in ("format", "modality", "photometric", "original_size", "window")
                if k in image.meta}
        stored = _stored_image(data, image.meta["format"]) if settings.store_images else (None, None)
        return record(served, data, image.meta["format"], verdict, result, {"image": meta},
                      image=stored[0], image_media_type=stored[1])

    def record(served: ServedModel, data: bytes, input_format: str, verdict: dict, result: dict, extra: dict,
               **stored) -> dict:
        """Store one study (the verdict, timings, backend and `extra`) and return the response body."""
        study = db.add(model=served.name, sha256=hashlib.sha256(data).hexdigest(), input_format=input_format,
                       prediction=_as_text(verdict["prediction"]),
                       threshold=verdict["threshold"] if not isinstance(verdict["threshold"], dict) else None,
                       result={**{k: v for k, v in verdict.items() if k not in ("prediction", "threshold")},
                               "timings_ms": result["timings_ms"], **extra, "backend": served.predictor.backend},
                       **stored)
        log.info("study %s: model %s, %s, %s", study.id, served.name, input_format, verdict["prediction"])
        return {"study_id": study.id, "study_url": f"{API}/studies/{study.id}", **result}

    def run_series(served: ServedModel, data: bytes, name: str, heatmap: bool, started: float) -> dict:
        """A sequence model's upload: a zip of one series (or a NIfTI file), one result per series with the
        sequence attention per drawn slice and, with `heatmap`, the weighted attention montage."""
        if not is_series_upload(name, data):
            raise ServiceError(415, "a sequence model takes one series: a zip of its DICOM (or slice image) "
                                    "files, or a .nii/.nii.gz file", name)
        predictor = served.predictor
        try:
            with unpacked_series(data, name, max_bytes=settings.max_bytes * 20) as path:
                verdict, shown, x = predictor.predict_series(path)
        except InputError as err:
            raise ServiceError(_input_status(err), err.reason, name) from None
        for s in verdict["slices"]:  # names inside the upload's temporary folder mean nothing to the client
            s.pop("file", None)
        t_inf = time.perf_counter()
        result = {"model": served.name, **verdict}
        if heatmap and served.explainer is not None:
            with served.lock:
                result["montage_png"] = _montage_png(served.explainer, verdict, shown, x)
        t_heat = time.perf_counter()
        result["timings_ms"] = {"inference": round((t_inf - started) * 1000, 2),
                                "heatmap": round((t_heat - t_inf) * 1000, 2),
                                "total": round((t_heat - started) * 1000, 2)}
        result["backend"] = predictor.backend
        return record(served, data, "series", verdict, result, {})

    def _as_text(prediction) -> str:
        """A multi-label verdict (the labels above their thresholds) as one database cell."""
        return "|".join(prediction) if isinstance(prediction, list) else prediction

    @app.get("/healthz", tags=["service"])
    def healthz():
        with db.engine.connect() as conn:  # proves the database answers
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "models": sorted(models)}

    @app.get(f"{API}/models", tags=["models"])
    def list_models():
        """Every loaded model with its modality, classes, metrics and intended use."""
        return {"models": [models[name].card() for name in sorted(models)], "default": default_model}

    @app.post(f"{API}/predict", tags=["predict"])
    def predict(file: UploadFile = File(..., description="PNG, JPEG or DICOM image; for a sequence model a zip "
                                                          "of one series or a NIfTI file"),
                model: Optional[str] = Form(None, description="model name (default: the first)"),
                heatmap: bool = Form(True, description="also return a Grad-CAM++ overlay")):
        """Class probabilities, the label at the model's operating threshold, lesions, heat map, timings."""
        return run_one(pick(model), file, heatmap)

    @app.post(f"{API}/predict/batch", tags=["predict"])
    def predict_batch(files: List[UploadFile] = File(...), model: Optional[str] = Form(None),
                      heatmap: bool = Form(False)):
        """Several files: one result per file, in order; a bad file gets an error entry, the rest go on."""
        served = pick(model)
        results = []
        for upload in files:
            try:
                results.append({"file": upload.filename, "status": 200, **run_one(served, upload, heatmap)})
            except ServiceError as err:
                results.append({"file": upload.filename, "status": err.status, "error": err.message})
        return {"model": served.name, "results": results}

    @app.get(f"{API}/studies/{{study_id}}", tags=["studies"])
    def get_study(study_id: str):
        study = db.get(study_id)
        if study is None:
            raise ServiceError(404, f"no study {study_id!r}")
        return study.as_dict()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("chestdx.serve").joinpath("static/index.html").read_text()

    return app


def _png_b64(rgb_or_rgba: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb_or_rgba, cv2.COLOR_RGBA2BGRA if rgb_or_rgba.shape[-1] == 4
                                                 else cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _heatmap_pngs(shown: np.ndarray, heat: np.ndarray, crop=None) -> dict:
    """The image, the heat map alone (for the opacity slider) and a ready-made overlay; the model's
    crop box, if any, drawn on the image and the overlay."""
    grey = np.clip(shown * 255 + 0.5, 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(np.clip(heat * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    image = np.ascontiguousarray(np.stack([grey] * 3, -1))
    if crop is not None:
        draw_box(image, crop)
    return {"image_png": _png_b64(image), "heatmap_png": _png_b64(colour),
            "overlay_png": _png_b64(overlay_rgb(shown, heat, crop=crop))}


def _montage_png(explainer, verdict: dict, shown: np.ndarray, x) -> str:
    """Fig. 6 montage of a series (PyTorch model), as a data URL."""
    import tempfile

    from chestdx.explain.sequence import write_series_montage

    with tempfile.TemporaryDirectory() as tmp:
        path = write_series_montage(explainer, verdict, shown, x, Path(tmp) / "montage.png")
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _stored_image(data: bytes, fmt: str) -> tuple[bytes, str]:
    if fmt == "dicom":
        return deidentify_dicom(data), "application/dicom"
    return data, "image/png" if fmt == "png" else "image/jpeg"



def app_from_env() -> FastAPI:
    """The app configured by CHESTDX_SERVE_* variables (set by `chestdx serve`; one per worker)."""
    import os

    from chestdx.settings import home as chestdx_home

    home = chestdx_home()
    return create_app(ServiceSettings(
        models_dir=Path(os.environ.get("CHESTDX_SERVE_MODELS", home / "models")),
        db_url=os.environ.get("CHESTDX_SERVE_DB", f"sqlite:///{home / 'studies.db'}"),
        cache_dir=home / "cache" / "onnx",
        store_images=os.environ.get("CHESTDX_SERVE_STORE_IMAGES") == "1",
        max_upload_mb=float(os.environ.get("CHESTDX_SERVE_MAX_MB", 50)),
        max_pixels=int(os.environ.get("CHESTDX_SERVE_MAX_PIXELS", 50_000_000)),
    ))
