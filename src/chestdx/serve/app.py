"""The online diagnostic service: REST API (versioned, OpenAPI at /docs) and a web page, one process.

The process holds only read-only models; every result goes to the database, so copies of the
service can run side by side behind a load balancer. Bad input never reaches a traceback: it
gets a 4xx with a JSON body `{"error": {"status", "message", "file"}}`.

Inputs by the model's sample kind (`/api/v1/models`: `input` "image" or "series", `sample`):
an image model takes one PNG, JPEG or DICOM image; a sequence or volume model one whole series (a
zip of its DICOM or slice image files, or a .nii/.nii.gz file; `series.unpacked_series` holds it to
its limits). A volume model (sample "volume") answers its verdict and, with `heatmap`, a montage of
slices with its attention on top (`montage_png`, a data URL). Routes and status codes:

- `POST /api/v1/predict`: 200 with the result; for a volume model too slow for one request, 202
  with a job (below). 400/413/415/422 for bad input (the file named), 401/403, 404 unknown model,
  503 (+ Retry-After) when a job is needed and this process's job queue is full.
- `POST /api/v1/predict/batch`: 200 with one entry per file (its own status: 200, 202, 4xx).
- `POST /api/v1/jobs`: 202 `{"job_id", "status", "status_url", ...}` for a series model; 400 for an
  image model; 413/415 as predict; 503 + Retry-After when the queue is full.
- `GET /api/v1/jobs/{id}`: 200 with the job's status (and result or error); 404 for an unknown job
  or another organisation's.
- `GET /api/v1/studies/{id}`: 200, or 404 (also for another organisation's).

When `/predict` answers a volume synchronously and when with a job, and how jobs are kept, run,
leased and refused: see `chestdx.serve.jobs`. In short: synchronously iff twice the model's warm-up
pass at load (a zero volume of its input size) is at most `max_sync_seconds` (10 s by default).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from chestdx.data.io import MAX_PIXELS, decode_image
from chestdx.errors import InputError, printable
from chestdx.explain.render import draw_box, overlay_rgb
from chestdx.serve.auth import LOCAL, SESSION_COOKIE, SESSION_HOURS, Accounts, Principal, same_token
from chestdx.serve.db import Database
from chestdx.serve.deid import deidentify
from chestdx.serve.jobs import JobError, JobRunner, JobsFull, Work, sync_allowed
from chestdx.serve.registry import ServedModel, load_models
from chestdx.serve.security import RequestGuard
from chestdx.serve.series import is_series_upload, unpacked_series

log = logging.getLogger("chestdx.serve")
API = "/api/v1"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# "testclient" is the peer name of Starlette's in-process test client (never a network address).
LOOPBACK = ("127.0.0.1", "::1", "localhost", "testclient")
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}


@dataclass
class ServiceSettings:
    models_dir: Path
    db_url: str
    cache_dir: Path
    store_images: bool = False
    max_upload_mb: float = 50.0  # one file
    max_request_mb: float = 200.0  # one request (a batch of files)
    max_batch_files: int = 100
    max_pixels: int = MAX_PIXELS  # the same limit as the command line
    body_timeout_s: float = 30.0  # a body that stops arriving ends in 408
    decode_slots: int = 2  # images decoded at once: bounds the memory of many large uploads
    heatmap_method: str = "gradcam++"
    onnx_threads: int = 1  # per request: concurrent requests share the cores
    auth: bool = True  # off only for a service bound to loopback (`chestdx serve --no-auth`)
    cors_origins: tuple = field(default_factory=tuple)  # none: browsers on other sites cannot read answers
    secure_cookies: bool = False  # also set Secure when the service itself is not behind https
    public_origins: tuple = field(default_factory=tuple)  # the page's origin(s) as browsers see them behind a proxy
    # volume models and jobs (chestdx.serve.jobs)
    max_sync_seconds: float = 10.0  # /predict answers a volume at once iff 2 x the model's warm-up pass fits
    job_workers: int = 1  # jobs run at once in one service process (each holds a decode slot)
    job_queue: int = 4  # jobs waiting in one process; one more gets 503 + Retry-After
    job_lease_s: float = 30.0  # a queued or running job whose process stops renewing this long is failed
    job_timeout_s: float = 900.0  # a job not done this long after it was queued is failed
    job_keep_s: float = 3600.0  # a finished job (its result, montage included) is deleted after this
    job_dir: Path | None = None  # where uploads wait for their job (default: a private folder in /tmp)

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ServiceError(Exception):
    def __init__(self, status: int, message: str, file: str | None = None, headers: dict | None = None):
        self.status, self.message, self.file, self.headers = status, message, file, headers


class LoginForm(BaseModel):
    username: str = Field(max_length=128, pattern=r"^[^\x00-\x1f]+$")
    password: str = Field(max_length=1024)


def _input_status(err: InputError) -> int:
    """413 for size limits, 415 for what is not an image at all, 422 for damaged images."""
    reason = err.reason
    if "too large" in reason:
        return 413
    if reason.startswith("not a supported image"):
        return 415
    return 400 if reason.startswith("empty file") else 422


def _error(status: int, message: str, file: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message, "file": file}}, status, headers=headers)


def create_app(settings: ServiceSettings) -> FastAPI:
    models = load_models(settings.models_dir, settings.cache_dir, settings.onnx_threads)
    for served in models.values():
        served.warm_up(settings.max_sync_seconds / 2)  # volume models: the sync-or-job rule's estimate
    db = Database(settings.db_url)
    accounts = Accounts(db)
    default_model = sorted(models)[0]
    decode_slots = threading.BoundedSemaphore(settings.decode_slots)
    jobs = JobRunner(db, lambda work, data: run_job(work, data), workers=settings.job_workers,
                     queue_size=settings.job_queue, lease_s=settings.job_lease_s, timeout_s=settings.job_timeout_s,
                     keep_s=settings.job_keep_s, spool_dir=settings.job_dir)
    runs_jobs = any(m.predictor.takes_series for m in models.values())  # else no threads: statuses only

    @asynccontextmanager
    async def lifespan(_app):
        if runs_jobs:
            jobs.start()
        yield
        jobs.close()

    app = FastAPI(title="chestdx", version="1", description="Attention-guided diagnosis of chest CT and X-ray "
                  "images. Research use only, not for diagnosis.", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.models, app.state.db, app.state.settings, app.state.accounts = models, db, settings, accounts
    app.state.jobs = jobs
    if runs_jobs:
        jobs.start()  # also for an app used without its lifespan (a test client outside `with`)
    app.add_middleware(RequestGuard, max_body_bytes=int(settings.max_request_mb * 2**20),
                       body_timeout_s=settings.body_timeout_s, require_credentials=settings.auth)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"], allow_credentials=False)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError):
        return _error(exc.status, exc.message, exc.file, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(422, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        message = {404: "no such page or API route", 405: "method not allowed on this route"}.get(
            exc.status_code, str(exc.detail))
        if message.startswith("Invalid multipart data"):
            message = ("the multipart form could not be parsed: it is malformed, or a part's headers (a file name) "
                       "are longer than the parser accepts")
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def database_refused(_request: Request, exc: DBAPIError):  # e.g. text PostgreSQL cannot store
        if isinstance(exc, DataError):
            return _error(400, "a value in the request cannot be stored (e.g. a NUL character)")
        log.error("database error: %s", type(exc.orig).__name__)
        return _error(503, "the database is not answering; try again")

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):  # a bug: logged, answered in the one schema
        log.exception("unexpected error")
        return _error(500, "internal error; the request was not processed")

    # who is asking ------------------------------------------------------------------------------
    def caller(request: Request) -> Principal:
        if not settings.auth:
            # No accounts: only this machine may ask, and no web page elsewhere through its browser.
            if (request.client.host if request.client else "") not in LOOPBACK:
                raise ServiceError(403, "this service runs without authentication and answers this machine only")
            if request.method not in SAFE_METHODS:
                _same_origin(request)
            return LOCAL
        key = request.headers.get("x-api-key") or _bearer(request.headers.get("authorization", ""))
        if key:
            found = accounts.by_key(key)
            if found is None:
                raise ServiceError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
            return found
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            found = accounts.by_session(token)
            if found is None:
                raise ServiceError(401, "the login session has expired; log in again",
                                   headers={"WWW-Authenticate": "Bearer"})
            principal = found[0]
            if request.method not in SAFE_METHODS:
                _same_origin(request)
                if not same_token(request.headers.get("x-csrf-token"), principal.csrf_token):
                    raise ServiceError(403, "missing or wrong X-CSRF-Token header for this login session")
            return principal
        raise ServiceError(401, "authentication required: an API key (X-API-Key header or Authorization: Bearer) "
                                "or a login session", headers={"WWW-Authenticate": "Bearer"})

    def _same_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        allowed = (f"{request.url.scheme}://{request.url.netloc}", *settings.public_origins, *settings.cors_origins)
        if origin and origin not in allowed:
            raise ServiceError(403, f"cross-site request from {origin[:100]} refused")

    def needs(scope: str):
        def check(principal: Principal = Depends(caller)) -> Principal:
            if not principal.allows(scope):
                raise ServiceError(403, f"this key or user lacks the {scope!r} scope")
            return principal
        return check

    def pick(name: Optional[str]) -> ServedModel:
        name = name or default_model
        if name not in models:
            raise ServiceError(404, f"unknown model {name[:100]!r}; available: {', '.join(sorted(models))}")
        return models[name]

    def read_upload(upload: UploadFile) -> bytes:
        data = upload.file.read(settings.max_bytes + 1)
        if len(data) > settings.max_bytes:
            raise ServiceError(413, f"file is larger than the {settings.max_upload_mb:g} MB limit",
                               _client_name(upload))
        return data

    def run_one(served: ServedModel, upload: UploadFile, heatmap: bool, principal: Principal,
                overlay: bool = False) -> dict:
        """The result body, or (a volume model too slow for one request) a queued job's body. `overlay`:
        with a heat map, also the image and heat map blended into one PNG (the page blends them itself)."""
        name = _client_name(upload)
        started = time.perf_counter()
        data = read_upload(upload)
        if served.predictor.takes_series:
            check_series_upload(served, data, name)
            if served.sample == "volume" and not sync_allowed(served.warmup_s, settings.max_sync_seconds):
                return queue_job(served, data, name, heatmap, principal)
            return run_series(served, data, name, heatmap, started, principal)
        if is_series_upload(name, data):
            series_models = sorted(n for n, m in models.items() if m.predictor.takes_series)
            raise ServiceError(415, f"model {served.name!r} takes one image (PNG, JPEG or DICOM slice), not a "
                                    "series (zip or NIfTI)" + (f"; series models: {', '.join(series_models)}"
                                                               if series_models else ""), name)
        predictor = served.predictor
        with decode_slots:  # decoded pixels are the big allocation: a few at a time
            try:
                image = decode_image(data, name, max_pixels=settings.max_pixels, hu_window=predictor.hu_window)
                if image.meta.get("frames", 1) > 1:
                    raise InputError(name, f"{image.meta['frames']}-frame DICOM; send one slice")
                predictor.check_input(image)  # not a chest image, or unlike the training images: no diagnosis
            except InputError as err:
                raise ServiceError(_input_status(err), err.reason, name) from None
            t_decode = time.perf_counter()
            shown, x = predictor.prepare(image.to_gray())
            meta = image.meta
            del image  # the full-size pixels live only inside the slot: that is what bounds the memory
        t_pre = time.perf_counter()
        one_pass = heatmap and served.closed_form(settings.heatmap_method)
        out, boxes, *first = predictor.predict_tensor(x, with_boxes=True, features=one_pass)
        first_view = first[0] if first else None
        verdict = predictor.describe({name: p[0] for name, p in out.items()})
        t_inf = time.perf_counter()
        result = {"model": served.name, **verdict}
        crop = None
        if boxes is not None:  # the model's own crop (AG-CNN's local branch input), on the model's grid
            crop = [float(v) for v in boxes[0]]
            result["crop_box"] = {"x0": crop[0], "y0": crop[1], "x1": crop[2], "y1": crop[3],
                                  "grid": list(shown.shape[:2])}
        if heatmap and served.heatmaps(settings.heatmap_method):
            target = served.heatmap_target(verdict["prediction"])
            heat = served.heatmap(x, settings.heatmap_method, target, first_view)
            result["heatmap"] = {"method": settings.heatmap_method, "target": _as_text(verdict["prediction"]),
                                 "computed": served.heatmap_backend(settings.heatmap_method),
                                 **_heatmap_pngs(shown, heat, crop, overlay)}
        t_heat = time.perf_counter()
        result["timings_ms"] = {k: round(v * 1000, 2) for k, v in (
            ("decode", t_decode - started), ("preprocess", t_pre - t_decode), ("inference", t_inf - t_pre),
            ("heatmap", t_heat - t_inf), ("total", t_heat - started))}
        result["backend"] = predictor.backend
        fmt = meta["format"]
        meta = {k: meta.get(k) for k in ("format", "modality", "photometric", "original_size", "window") if k in meta}
        try:
            stored = _stored_image(data, fmt) if settings.store_images else (None, None)
        except InputError as err:
            raise ServiceError(422, f"cannot be de-identified for storing: {err.reason}", name) from None
        return record(served, principal, data, fmt, verdict, result, {"image": meta},
                      image=stored[0], image_media_type=stored[1])

    def record(served: ServedModel, principal: Principal, data: bytes, input_format: str, verdict: dict,
               result: dict, extra: dict, **stored) -> dict:
        """Store one study (the verdict, timings, backend and `extra`), owned by the caller's organisation,
        and return the response body."""
        study = db.add(model=served.name, sha256=hashlib.sha256(data).hexdigest(), input_format=input_format,
                       prediction=_as_text(verdict["prediction"]),
                       threshold=verdict["threshold"] if not isinstance(verdict["threshold"], dict) else None,
                       result={**{k: v for k, v in verdict.items() if k not in ("prediction", "threshold")},
                               "timings_ms": result["timings_ms"], **extra, "backend": served.predictor.backend},
                       org_id=principal.org_id, created_by=principal.actor,
                       audit={"actor": principal.actor, "action": "create", "detail": served.name}, **stored)
        log.info("study %s: model %s, %s, %s", study.id, served.name, input_format, verdict["prediction"])
        return {"study_id": study.id, "study_url": f"{API}/studies/{study.id}", **result}

    def check_series_upload(served: ServedModel, data: bytes, name: str) -> None:
        if not is_series_upload(name, data):
            raise ServiceError(415, f"a {served.sample} model takes one series: a zip of its DICOM (or slice "
                                    "image) files, or a .nii/.nii.gz file", name)

    def queue_job(served: ServedModel, data: bytes, name: str, heatmap: bool, principal: Principal) -> dict:
        try:
            job = jobs.submit(data, name, served.name, heatmap, principal, estimate_s=served.warmup_s or 1.0)
        except JobsFull as full:
            raise ServiceError(503, full.message, name, headers={"Retry-After": str(full.retry_after)}) from None
        db.audit(principal.actor, "job_create", principal.org_id, detail=f"job {job.id} model {served.name}")
        log.info("job %s: model %s queued", job.id, served.name)
        return JobRunner.body(job, f"{API}/jobs/{job.id}")

    def run_job(work: Work, data: bytes) -> dict:
        """A job's work, in a worker thread: what /predict would have answered, or its error."""
        try:
            return run_series(models[work.model], data, work.name, work.heatmap, time.perf_counter(),
                              work.principal)
        except ServiceError as err:
            raise JobError(err.status, err.message) from None

    def run_series(served: ServedModel, data: bytes, name: str, heatmap: bool, started: float,
                   principal: Principal) -> dict:
        """A series model's upload: a zip of one series (or a NIfTI file), one result per series. A sequence
        model adds the sequence attention per drawn slice and, with `heatmap`, the weighted attention
        montage; a volume model its verdict (infection ratio, attention in the lungs) and, with `heatmap`,
        a montage of its attention over the volume."""
        check_series_upload(served, data, name)
        if served.sample == "volume":
            return run_volume(served, data, name, heatmap, started, principal)
        predictor = served.predictor
        try:
            with decode_slots, unpacked_series(data, name, max_bytes=settings.max_bytes * 20) as path:
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
        return record(served, principal, data, "series", verdict, result, {})

    def run_volume(served: ServedModel, data: bytes, name: str, heatmap: bool, started: float,
                   principal: Principal) -> dict:
        try:
            with decode_slots, unpacked_series(data, name, max_bytes=settings.max_bytes * 20) as path:
                t_start = time.perf_counter()
                verdict, shown, outputs = served.predictor.predict_volume(path)
        except InputError as err:
            raise ServiceError(_input_status(err), err.reason, name) from None
        t_inf = time.perf_counter()
        result = {"model": served.name, **verdict}
        attention = outputs.get("attention")
        if heatmap and attention is not None:
            p = verdict["probabilities"].get(_as_text(verdict["prediction"]))
            title = f"{served.name}: {_as_text(verdict['prediction'])}" + (f" p={p:.3f}" if p is not None else "")
            result["montage_png"] = _volume_montage_png(shown, attention, title)
            result["heatmap"] = {"method": "attention", "computed": served.heatmap_backend("attention"),
                                 "grid": list(shown.shape)}
        t_heat = time.perf_counter()
        result["timings_ms"] = {"unpack": round((t_start - started) * 1000, 2),
                                "inference": round((t_inf - t_start) * 1000, 2),
                                "heatmap": round((t_heat - t_inf) * 1000, 2),
                                "total": round((t_heat - started) * 1000, 2)}
        result["backend"] = served.predictor.backend
        return record(served, principal, data, "series", verdict, result, {})

    def _as_text(prediction) -> str:
        """A multi-label verdict (the labels above their thresholds) as one database cell."""
        return "|".join(prediction) if isinstance(prediction, list) else prediction

    # routes -------------------------------------------------------------------------------------
    @app.head("/healthz", include_in_schema=False)  # load balancers that probe with HEAD
    @app.get("/healthz", tags=["service"])
    def healthz():
        with db.engine.connect() as conn:  # proves the database answers
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "models": sorted(models)}

    @app.post(f"{API}/login", tags=["accounts"])
    def login(form: LoginForm, request: Request, response: Response):
        """A login session for the web page: an HttpOnly cookie and the CSRF token to send back."""
        _same_origin(request)
        found = accounts.login(form.username, form.password)
        if found is None:
            db.audit(f"user:{form.username[:100]}", "login_failed")
            raise ServiceError(401, "wrong user name or password")
        token, csrf, user = found
        response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600, httponly=True, samesite="strict",
                            secure=settings.secure_cookies or request.url.scheme == "https"
                            or any(o.startswith("https://") for o in settings.public_origins), path="/")
        db.audit(f"user:{user.username}", "login", user.org_id)
        return {"user": user.username, "admin": user.is_admin, "csrf_token": csrf}

    @app.post(f"{API}/logout", tags=["accounts"])
    def logout(request: Request, response: Response, principal: Principal = Depends(caller)):
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            accounts.logout(token)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        db.audit(principal.actor, "logout", principal.org_id)
        return {"status": "logged out"}

    @app.get(f"{API}/me", tags=["accounts"])
    def me(principal: Principal = Depends(caller)):
        """Who the caller is, and (for a login session) the CSRF token the page sends with posts."""
        return {"actor": principal.actor, "scopes": sorted(principal.scopes), "csrf_token": principal.csrf_token,
                "auth": settings.auth}

    @app.get(f"{API}/models", tags=["models"])
    def list_models(_principal: Principal = Depends(caller)):
        """Every loaded model with its modality, classes, metrics and intended use."""
        return {"models": [models[name].card(settings.heatmap_method, settings.max_sync_seconds)
                           for name in sorted(models)], "default": default_model}

    @app.post(f"{API}/predict", tags=["predict"], responses={202: {"description": "a volume model too slow "
                                                                   "for one request: a queued job"}})
    def predict(file: UploadFile = File(..., description="PNG, JPEG or DICOM image; for a sequence or volume "
                                                          "model a zip of one series or a NIfTI file"),
                model: Optional[str] = Form(None, description="model name (default: the first)"),
                heatmap: bool = Form(True, description="also return a Grad-CAM++ heat map: the image and the "
                                                       "map as PNGs (volume models: a montage of the attention)"),
                overlay: bool = Form(False, description="with the heat map, also the two blended into one PNG "
                                                        "(`overlay_png`)"),
                principal: Principal = Depends(needs("predict"))):
        """Class probabilities, the label at the model's operating threshold, lesions, heat map, timings.
        A volume model whose warm-up pass is too slow for one request answers 202 with a job instead."""
        body = run_one(pick(model), file, heatmap, principal, overlay)
        if "job_id" in body:
            return JSONResponse(body, 202, headers={"Location": body["status_url"]})
        return body

    @app.post(f"{API}/jobs", tags=["jobs"], status_code=202)
    def create_job(file: UploadFile = File(..., description="one series: a zip of its DICOM (or slice image) "
                                                             "files, or a .nii/.nii.gz file"),
                   model: Optional[str] = Form(None, description="a volume or sequence model (default: the first)"),
                   heatmap: bool = Form(True, description="also return the attention montage"),
                   principal: Principal = Depends(needs("predict"))):
        """Queue a series for a volume (or sequence) model; poll `status_url` for the result."""
        served = pick(model)
        if not served.predictor.takes_series:
            raise ServiceError(400, f"model {served.name!r} takes single images and answers at once on "
                                    f"{API}/predict; jobs are for volume and sequence models")
        name = _client_name(file)
        data = read_upload(file)
        check_series_upload(served, data, name)
        body = queue_job(served, data, name, heatmap, principal)
        return JSONResponse(body, 202, headers={"Location": body["status_url"]})

    @app.get(f"{API}/jobs/{{job_id}}", tags=["jobs"])
    def get_job(job_id: str, principal: Principal = Depends(needs("read"))):
        """A job's status; its result (the body /predict returns) when done, its error when failed.
        Readable by its creator's organisation and by administrators."""
        job = jobs.get(job_id) if _is_uuid(job_id) else None
        if job is None or not (principal.is_admin or job.org_id == principal.org_id):
            if job is not None:
                db.audit(principal.actor, "job_read_denied", principal.org_id, detail=f"job {job.id}")
            raise ServiceError(404, f"no job {job_id[:64]!r}")
        if job.status in ("done", "failed"):  # polls of a waiting job are not audited, the outcome's read is
            db.audit(principal.actor, "job_read", principal.org_id, job.study_id, f"job {job.id}")
        return JobRunner.body(job, f"{API}/jobs/{job.id}")

    @app.post(f"{API}/predict/batch", tags=["predict"])
    def predict_batch(files: List[UploadFile] = File(...), model: Optional[str] = Form(None),
                      heatmap: bool = Form(False), overlay: bool = Form(False),
                      principal: Principal = Depends(needs("predict"))):
        """Several files: one result per file, in order; a bad file gets an error entry, the rest go on."""
        served = pick(model)
        if len(files) > settings.max_batch_files:
            raise ServiceError(413, f"{len(files)} files in one batch; at most {settings.max_batch_files}")
        results = []
        for upload in files:
            try:
                body = run_one(served, upload, heatmap, principal, overlay)
                results.append({"file": _client_name(upload), "status": 202 if "job_id" in body else 200, **body})
            except ServiceError as err:
                results.append({"file": _client_name(upload), "status": err.status, "error": err.message})
        return {"model": served.name, "results": results}

    @app.get(f"{API}/studies/{{study_id}}", tags=["studies"])
    def get_study(study_id: str, principal: Principal = Depends(needs("read"))):
        """One stored study: readable by its creator's organisation and by administrators."""
        study = db.get(study_id) if _is_uuid(study_id) else None
        if study is None or not (principal.is_admin or study.org_id == principal.org_id):
            if study is not None:
                db.audit(principal.actor, "read_denied", principal.org_id, study.id)
            raise ServiceError(404, f"no study {study_id[:64]!r}")
        db.audit(principal.actor, "read", principal.org_id, study.id)
        return study.as_dict()

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_principal: Principal = Depends(caller)):
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    def docs(_principal: Principal = Depends(caller)):
        return get_swagger_ui_html(openapi_url="/openapi.json", title="chestdx API")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        """The page holds no data; it asks for a login before anything else."""
        return resources.files("chestdx.serve").joinpath("static/index.html").read_text()

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in STATIC:
            raise ServiceError(404, "no such file")
        return Response(resources.files("chestdx.serve").joinpath(f"static/{name}").read_text(),
                        media_type=STATIC[name])

    return app


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _client_name(upload: UploadFile) -> str:
    """The client's file name, only for messages: its last path part, printable, at most 120 characters."""
    name = (upload.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return printable(name, 120) or "upload"


def _png_b64(pixels: np.ndarray) -> str:
    """A grey (H, W), RGB or RGBA uint8 image as a PNG data URL."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA if pixels.shape[-1] == 4 else cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", pixels)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


_JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]  # RGB per level


def _heat_png_b64(heat: np.ndarray) -> str:
    """The heat map in the JET colours as an indexed PNG: the same pixels as an RGB one (the map has
    256 levels either way), a third of the bytes to compress and send."""
    from PIL import Image

    picture = Image.fromarray(np.clip(heat * 255 + 0.5, 0, 255).astype(np.uint8), mode="L").convert("P")
    picture.putpalette(_JET.tobytes())
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _heatmap_pngs(shown: np.ndarray, heat: np.ndarray, crop=None, overlay: bool = False) -> dict:
    """The image and the heat map alone (the page lays one over the other with an opacity slider);
    `overlay`: also a ready-made blend. The model's crop box, if any, drawn on the image and the
    overlay. The image is a one-channel PNG unless a box is drawn on it."""
    grey = np.clip(shown * 255 + 0.5, 0, 255).astype(np.uint8)
    image = grey
    if crop is not None:
        image = np.ascontiguousarray(np.stack([grey] * 3, -1))
        draw_box(image, crop)
    pngs = {"image_png": _png_b64(image), "heatmap_png": _heat_png_b64(heat)}
    if overlay:
        pngs["overlay_png"] = _png_b64(overlay_rgb(shown, heat, crop=crop))
    return pngs


def _montage_png(explainer, verdict: dict, shown: np.ndarray, x) -> str:
    """Fig. 6 montage of a series (PyTorch model), as a data URL."""
    import tempfile

    from chestdx.explain.sequence import write_series_montage

    with tempfile.TemporaryDirectory() as tmp:
        path = write_series_montage(explainer, verdict, shown, x, Path(tmp) / "montage.png")
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _volume_montage_png(shown: np.ndarray, attention: np.ndarray, title: str) -> str:
    """Evenly spaced axial slices of the volume as the model saw it, with its attention on top, as a
    data URL. The slices are chosen among those that hold something (not the zero padding nor, for a
    lung-masked input, the slices outside the lungs)."""
    import tempfile

    from chestdx.explain.volume import choose_slices, montage_png

    heat = np.clip(np.asarray(attention, dtype=np.float32).reshape(shown.shape), 0.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = montage_png(shown, heat, Path(tmp) / "montage.png", title, n_tiles=16, axis=0,
                           slices=choose_slices(shown, 16, axis=0))
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _stored_image(data: bytes, fmt: str) -> tuple[bytes, str]:
    """The upload as stored: de-identified (DICOM to the PS3.15 basic profile, PNG/JPEG metadata stripped)."""
    return deidentify(data, fmt), {"dicom": "application/dicom", "png": "image/png", "jpeg": "image/jpeg"}[fmt]


def app_from_env() -> FastAPI:
    """The app configured by CHESTDX_SERVE_* variables (set by `chestdx serve`; one per worker)."""
    one_thread_per_request()
    return create_app(settings_from_env())


def one_thread_per_request() -> None:
    """A service process answers many requests at once, each on its own thread: the math libraries'
    own thread pools (BLAS, OpenCV) then only fight over the cores (measured at 8 clients on 2 cores:
    the closed-form heat map 80 ms under load for 11 ms alone). ONNX Runtime is one thread per request
    already; torch keeps its threads for the PyTorch paths, which run one request at a time."""
    import chestdx.evaluate.calibration  # noqa: F401  (loads SciPy, and its own BLAS, before the limit)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    cv2.setNumThreads(1)


def settings_from_env() -> ServiceSettings:
    """ServiceSettings from the CHESTDX_SERVE_* variables, with the defaults of `chestdx serve`."""
    import os

    from chestdx.settings import home as chestdx_home

    home = chestdx_home()
    env = os.environ.get
    return ServiceSettings(
        models_dir=Path(env("CHESTDX_SERVE_MODELS", home / "models")),
        db_url=env("CHESTDX_SERVE_DB", f"sqlite:///{home / 'studies.db'}"),
        cache_dir=home / "cache" / "onnx",
        store_images=env("CHESTDX_SERVE_STORE_IMAGES") == "1",
        max_upload_mb=float(env("CHESTDX_SERVE_MAX_MB", 50)),
        max_pixels=int(env("CHESTDX_SERVE_MAX_PIXELS", MAX_PIXELS)),
        auth=env("CHESTDX_SERVE_AUTH", "1") != "0",
        cors_origins=tuple(o for o in env("CHESTDX_SERVE_CORS", "").split(",") if o),
        secure_cookies=env("CHESTDX_SERVE_SECURE_COOKIES") == "1",
        public_origins=tuple(o for o in env("CHESTDX_SERVE_PUBLIC_ORIGINS", "").split(",") if o),
        max_sync_seconds=float(env("CHESTDX_SERVE_MAX_SYNC_S", 10.0)),
        job_workers=int(env("CHESTDX_SERVE_JOB_WORKERS", 1)),
        job_queue=int(env("CHESTDX_SERVE_JOB_QUEUE", 4)),
    )


def deid_key(home: Path) -> str:
    """The secret behind replaced DICOM UIDs: CHESTDX_DEID_KEY, else one kept in $CHESTDX_HOME/deid.key, so
    every worker and every restart maps a UID to the same new UID."""
    import os
    import secrets

    if os.environ.get("CHESTDX_DEID_KEY"):
        return os.environ["CHESTDX_DEID_KEY"]
    path = home / "deid.key"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # never world-readable
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic and never overwrites: two processes starting at once agree
        except FileExistsError:
            pass
        tmp.unlink()
    return path.read_text().strip()
