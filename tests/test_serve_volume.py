"""Volume models in the service: a series upload (DICOM zip or NIfTI) in, the verdict and an attention
montage out, synchronously or as a job; jobs in the database, scoped to an organisation, failed when
their process dies; wrong input kinds get a clear 4xx, and nothing answers 5xx unless it says why."""

from __future__ import annotations

import base64
import io
import shutil
import time
import zipfile
from datetime import datetime, timedelta, timezone

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from chestdx.serve.app import ServiceSettings, create_app

SHAPE = (12, 40, 40)  # (D, H, W)
SPACING = (3.0, 2.0, 2.0)  # mm, slice axis first
VOLATILE = ("study_id", "study_url", "timings_ms")


def hu_volume() -> np.ndarray:
    """A chest-like phantom in HU: body, two dark lungs with a brighter patch, noise."""
    d, h, w = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    hu = np.full(SHAPE, -1000.0)
    hu[((h - 20) / 18) ** 2 + ((w - 20) / 19) ** 2 < 1] = 40
    for cx in (11, 29):
        hu[((h - 20) / 13) ** 2 + ((w - cx) / 7) ** 2 < 1] = -820
    hu[(np.abs(d - 6) < 3) & (np.abs(h - 18) < 4) & (np.abs(w - 11) < 3)] = -300
    hu += np.random.default_rng(0).normal(0, 25, SHAPE)
    return np.clip(np.round(hu), -1024, 3000).astype(np.int16)  # stored as HU + 1024 in uint16


def dicom_zip(hu: np.ndarray) -> bytes:
    """The volume as an axial CT series (shuffled file names), zipped: x = 2 w, y = 2 h, z = 3 d mm."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    order = np.random.default_rng(1).permutation(hu.shape[0])
    series_uid, buf = generate_uid(), io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for k in range(hu.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, int(order[k]) + 1
            ds.PatientName = "Doe^Jane"
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.ImagePositionPatient = [0.0, 0.0, SPACING[0] * k]
            ds.PixelSpacing = [SPACING[1], SPACING[2]]
            ds.SliceThickness = SPACING[0]
            ds.Rows, ds.Columns = hu.shape[1:]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            z.writestr(f"series/IM{order[k]:04d}.dcm", out.getvalue())
    return buf.getvalue()


def nifti_bytes(hu: np.ndarray, tmp_path) -> bytes:
    import nibabel

    path = tmp_path / "v.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.transpose(hu, (2, 1, 0)), np.diag([SPACING[2], SPACING[1], SPACING[0], 1])),
                 path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def models_dir(tiny_models_dir, tmp_path_factory):
    import torch

    from chestdx.models.bundle import make_bundle, save_bundle
    from chestdx.models.dsan import DIAGNOSIS, DSAN, DualSamplingEnsemble
    from chestdx.train.config import load_config

    folder = tmp_path_factory.mktemp("volume-models")
    cfg = load_config("configs/dsan_ds.yaml", ["model.widen_factor=0.125", "preprocess.size=[16,32,32]",
                                               "preprocess.lung_mask=false", "preprocess.spacing=[4,2,2]"])
    torch.manual_seed(0)
    ens = DualSamplingEnsemble([DSAN(widen_factor=0.125), DSAN(widen_factor=0.125)], [DIAGNOSIS]).eval()
    save_bundle(make_bundle(ens, cfg), folder / "dsan.pt")
    shutil.copy(tiny_models_dir / "ladnn-tiny.pt", folder / "ladnn-tiny.pt")
    return folder


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    hu = hu_volume()
    return {"zip": dicom_zip(hu), "nifti": nifti_bytes(hu, tmp_path_factory.mktemp("nifti"))}


def make_app(models_dir, root, url, **kw):
    return create_app(ServiceSettings(models_dir=models_dir, db_url=url, cache_dir=root / "cache",
                                      job_dir=root / "spool", max_upload_mb=5, **kw))


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("volume-service")
    application = make_app(models_dir, root, f"sqlite:///{root / 'db.sqlite'}")
    accounts = application.state.accounts
    application.state.keys = {"a": accounts.create_key("a", ["predict", "read"])[0],
                              "a_predict": accounts.create_key("a", ["predict"])[0],
                              "b": accounts.create_key("b", ["predict", "read"])[0],
                              "admin": accounts.create_key("ops", ["admin"])[0]}
    application.state.root = root
    yield application
    application.state.jobs.close()


class Client:
    """A test client that fails the test on any 5xx the test did not ask for."""

    def __init__(self, app, key):
        self.c = TestClient(app, headers={"X-API-Key": app.state.keys[key]}, raise_server_exceptions=False)

    def __getattr__(self, method):
        def call(*args, allow_5xx=False, **kw):
            res = getattr(self.c, method)(*args, **kw)
            assert allow_5xx or res.status_code < 500, res.text[:500]
            if res.status_code >= 400:
                body = res.json()
                assert set(body) == {"error"} and body["error"]["status"] == res.status_code
            return res
        return call


def post(c: Client, route: str, name: str, data: bytes, model="dsan", **kw):
    return c.post(f"/api/v1/{route}", files={"file": (name, data)}, data={"model": model}, **kw)


def wait(c: Client, url: str, timeout: float = 60) -> dict:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = c.get(url)
        assert res.status_code == 200, res.text
        body = res.json()
        seen.append(body["status"])
        if body["status"] in ("done", "failed"):
            body["seen"] = seen
            return body
        time.sleep(0.05)
    raise AssertionError(f"job still {seen[-1]} after {timeout} s")


def stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in VOLATILE}


def _png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return cv2.imdecode(np.frombuffer(base64.b64decode(data_url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)


def test_models_listing_says_the_input_is_a_volume(app):
    cards = {c["name"]: c for c in Client(app, "a").get("/api/v1/models").json()["models"]}
    volume, image = cards["dsan"], cards["ladnn-tiny"]
    assert volume["input"] == "series" and volume["sample"] == "volume" and "volume" in volume["intended_use"]
    assert volume["answers"] == "synchronously" and volume["warmup_ms"] > 0 and volume["heatmaps"]
    assert image["input"] == "image" and image["sample"] == "image" and "answers" not in image


def test_a_nifti_and_a_dicom_zip_of_one_series_give_one_probability(app, uploads):
    c = Client(app, "a")
    bodies = {}
    for kind, name in (("zip", "Doe_Jane_series.zip"), ("nifti", "Doe_Jane.nii.gz")):
        res = post(c, "predict", name, uploads[kind])
        assert res.status_code == 200, res.text
        bodies[kind] = res.json()
    z, n = bodies["zip"], bodies["nifti"]
    assert z["probabilities"]["covid"] == pytest.approx(n["probabilities"]["covid"], abs=1e-5)
    assert z["prediction"] == n["prediction"] and z["infection_ratio"] == pytest.approx(n["infection_ratio"], abs=1e-5)
    assert z["backend"] == "onnxruntime" and z["heatmap"]["method"] == "attention"
    montage = _png(z["montage_png"])
    assert montage.shape[0] > 28 and montage.std() > 1  # title strip and tiles, not blank
    study = c.get(z["study_url"]).json()
    assert study["input_format"] == "series" and study["probabilities"] == pytest.approx(z["probabilities"])
    assert "Doe" not in str(study) and study["image_stored"] is False
    actions = [(e.action, e.study_id) for e in app.state.db.audit_log(20)]
    assert ("create", z["study_id"]) in actions and ("read", z["study_id"]) in actions


def test_a_job_goes_queued_to_done_with_the_synchronous_result(app, uploads, models_dir):
    c = Client(app, "a")
    sync = post(c, "predict", "s.zip", uploads["zip"]).json()
    res = post(c, "jobs", "s.zip", uploads["zip"])
    assert res.status_code == 202, res.text
    job = res.json()
    assert job["status"] == "queued" and res.headers["location"] == job["status_url"] == f"/api/v1/jobs/{job['job_id']}"
    done = wait(c, job["status_url"])
    assert done["status"] == "done" and done["started"] and done["finished"] >= done["created"], done
    result = done["result"]
    assert stable(result) == stable(sync)  # montage included, byte for byte
    assert c.get(result["study_url"]).status_code == 200
    assert not list((app.state.root / "spool").iterdir())  # the upload is gone with the job

    # Another service process on the same database, whose rule sends every volume to a job: its
    # /predict answers 202, and this process answers the job's status.
    other = make_app(models_dir, app.state.root, app.state.settings.db_url, max_sync_seconds=0)
    try:
        other.state.keys = app.state.keys
        o = Client(other, "a")
        assert {m["name"]: m for m in o.get("/api/v1/models").json()["models"]}["dsan"]["answers"] == "job"
        queued = post(o, "predict", "s.nii.gz", uploads["nifti"])
        assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text
        done = wait(c, queued.json()["status_url"])
        assert done["status"] == "done"
        assert done["result"]["probabilities"]["covid"] == pytest.approx(sync["probabilities"]["covid"], abs=1e-5)
    finally:
        other.state.jobs.close()


def test_a_job_is_read_only_by_its_organisation_and_admins(app, uploads):
    job = post(Client(app, "a"), "jobs", "s.nii.gz", uploads["nifti"]).json()
    url = job["status_url"]
    wait(Client(app, "a"), url)
    other = Client(app, "b").get(url)
    assert other.status_code == 404 and "no job" in other.json()["error"]["message"]
    assert Client(app, "admin").get(url).json()["status"] == "done"
    assert Client(app, "a_predict").get(url).status_code == 403  # reading needs the read scope
    assert Client(app, "a").get("/api/v1/jobs/not-a-uuid").status_code == 404
    assert Client(app, "a").get("/api/v1/jobs/00000000-0000-4000-8000-000000000000").status_code == 404
    assert ("job_read_denied", f"job {job['job_id']}") in [(e.action, e.detail) for e in app.state.db.audit_log(20)]


def test_a_job_whose_process_died_is_failed_after_its_lease(app):
    """Rows as a process that died left them: one running, one queued, leases about to pass."""
    db, c = app.state.db, Client(app, "a")
    org = app.state.accounts.by_key(app.state.keys["a"]).org_id
    now = datetime.now(timezone.utc)
    ids = [db.add_job(status=status, model="dsan", heatmap=True, org_id=org, created_by="key:x", owner="gone:1:dead",
                      started=now if status == "running" else None,
                      lease_until=now + timedelta(seconds=0.4)).id for status in ("running", "queued")]
    assert c.get(f"/api/v1/jobs/{ids[0]}").json()["status"] == "running"  # the lease still holds
    time.sleep(0.6)
    failed = c.get(f"/api/v1/jobs/{ids[0]}").json()  # the status route itself fails it
    assert failed["status"] == "failed" and failed["finished"]
    assert failed["error"]["status"] == 503 and "lease expired" in failed["error"]["message"]
    app.state.jobs.beat()  # and every process's heartbeat (and start-up) sweeps the rest
    assert db.get_job(ids[1]).status == "failed"


def test_wrong_input_kinds_get_a_clear_4xx(app, uploads):
    c = Client(app, "a")
    png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))[1].tobytes()
    res = post(c, "predict", "series.zip", uploads["zip"], model="ladnn-tiny")
    assert res.status_code == 415 and "not a series" in res.json()["error"]["message"]
    assert res.json()["error"]["file"] == "series.zip" and "dsan" in res.json()["error"]["message"]
    res = post(c, "predict", "slice.png", png)
    assert res.status_code == 415 and "volume model takes one series" in res.json()["error"]["message"]
    assert res.json()["error"]["file"] == "slice.png"
    assert post(c, "jobs", "slice.png", png).status_code == 415
    res = post(c, "jobs", "series.zip", uploads["zip"], model="ladnn-tiny")
    assert res.status_code == 400 and "jobs are for volume" in res.json()["error"]["message"]
    res = post(c, "predict", "cut.zip", uploads["zip"][:1000])
    assert res.status_code == 422 and res.json()["error"]["file"] == "cut.zip"
    res = post(c, "predict", "big.zip", b"PK\x03\x04" + b"\0" * (5 * 2**20))
    assert res.status_code == 413 and "5 MB" in res.json()["error"]["message"]
    huge = nifti_bytes_header(600, 600, 400)  # declares 144 M voxels, holds none
    res = post(c, "predict", "huge.nii", huge)
    assert res.status_code == 413 and "voxels" in res.json()["error"]["message"], res.text
    job = post(c, "jobs", "cut.nii.gz", uploads["nifti"][:300]).json()  # a bad series in a job: failed with a 4xx
    failed = wait(c, job["status_url"])
    assert failed["status"] == "failed" and 400 <= failed["error"]["status"] < 500, failed
    assert post(c, "predict", "ok.nii.gz", uploads["nifti"]).status_code == 200  # and the service keeps serving


def nifti_bytes_header(x: int, y: int, z: int) -> bytes:
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape((x, y, z))
    header.set_data_dtype(np.int16)
    return header.binaryblock + b"\0" * 4


def test_a_full_queue_answers_503_with_retry_after(app, uploads):
    c, jobs = Client(app, "a"), app.state.jobs
    held = 0
    while jobs.capacity.acquire(blocking=False):  # as if every worker and queue place were taken
        held += 1
    try:
        res = post(c, "jobs", "s.nii.gz", uploads["nifti"], allow_5xx=True)
        assert res.status_code == 503 and int(res.headers["retry-after"]) >= 1
        assert "queue is full" in res.json()["error"]["message"] and res.json()["error"]["file"] == "s.nii.gz"
    finally:
        for _ in range(held):
            jobs.capacity.release()
    assert post(c, "jobs", "s.nii.gz", uploads["nifti"]).status_code == 202


def test_jobs_on_postgresql(models_dir, uploads, tmp_path, request):
    url = request.getfixturevalue("postgres_url")
    application = make_app(models_dir, tmp_path, url)
    try:
        application.state.keys = {"a": application.state.accounts.create_key("vol-a", ["predict", "read"])[0],
                                  "b": application.state.accounts.create_key("vol-b", ["predict", "read"])[0]}
        c = Client(application, "a")
        sync = post(c, "predict", "s.zip", uploads["zip"]).json()
        job = post(c, "jobs", "s.zip", uploads["zip"]).json()
        done = wait(c, job["status_url"])
        assert done["status"] == "done" and done["result"]["probabilities"] == pytest.approx(sync["probabilities"])
        assert Client(application, "b").get(job["status_url"]).status_code == 404
        db = application.state.db
        stale = db.add_job(status="running", model="dsan", heatmap=True, owner="gone:1:dead",
                           lease_until=datetime.now(timezone.utc) - timedelta(seconds=1)).id
        application.state.jobs.beat()
        assert db.get_job(stale).status == "failed"
    finally:
        application.state.jobs.close()


def test_serve_flags_set_the_job_settings_every_worker_reads(monkeypatch, tmp_path):
    """`chestdx serve --max-sync-seconds/--job-workers/--job-queue` reach ServiceSettings through the
    environment that each uvicorn worker process reads."""
    import uvicorn
    from typer.testing import CliRunner

    import chestdx.serve.app as serve_app
    from chestdx.cli import app as cli

    seen = {}
    monkeypatch.setenv("CHESTDX_HOME", str(tmp_path))
    monkeypatch.setattr(serve_app, "app_from_env", lambda: None)  # no models folder needed here
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(settings=serve_app.settings_from_env()))
    serve_writes = ["CHESTDX_DEID_KEY"] + [f"CHESTDX_SERVE_{n}" for n in (
        "MODELS", "DB", "STORE_IMAGES", "MAX_MB", "MAX_PIXELS", "AUTH", "CORS", "SECURE_COOKIES",
        "PUBLIC_ORIGINS", "MAX_SYNC_S", "JOB_WORKERS", "JOB_QUEUE")]
    for name in serve_writes:  # set then removed, so that monkeypatch restores each after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    res = CliRunner().invoke(cli, ["serve", "--no-auth", "--models", str(tmp_path), "--max-sync-seconds", "0",
                                   "--job-workers", "3", "--job-queue", "7"])
    assert res.exit_code == 0, res.output
    s = seen["settings"]
    assert (s.max_sync_seconds, s.job_workers, s.job_queue) == (0.0, 3, 7)
    bad = CliRunner().invoke(cli, ["serve", "--no-auth", "--models", str(tmp_path), "--job-workers", "0"])
    assert bad.exit_code == 2 and "job-workers" in bad.output
