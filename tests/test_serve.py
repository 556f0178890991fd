"""The service through FastAPI's test client: every endpoint and every bad-input case."""

import base64
import io

import cv2
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from skimage import data as skimage_data

from chestdx.export import export_onnx
from chestdx.inference import Predictor
from chestdx.serve.app import ServiceSettings, create_app
from tests.test_io import make_dicom


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(request, tiny_models_dir, tmp_path_factory):
    """The service on SQLite and on a throwaway PostgreSQL, called with an API key of one organisation."""
    root = tmp_path_factory.mktemp("service")
    url = f"sqlite:///{root / 'studies.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    settings = ServiceSettings(models_dir=tiny_models_dir, db_url=url, cache_dir=root / "cache", store_images=True,
                               max_upload_mb=1, max_pixels=4_000_000)
    app = create_app(settings)
    secret, _ = app.state.accounts.create_key("clinic-a", ["predict", "read"], name="tests")
    with TestClient(app, headers={"X-API-Key": secret}) as client:
        yield client


@pytest.fixture(scope="module")
def ct_png(covid_ct_dir) -> bytes:
    return sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[0].read_bytes()


def _png(b64: str) -> np.ndarray:
    assert b64.startswith("data:image/png;base64,")
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)


def test_health_and_models(service):
    assert service.get("/healthz").json() == {"status": "ok", "models": ["ladnn-tiny"]}
    body = service.get("/api/v1/models").json()
    card = body["models"][0]
    assert body["default"] == "ladnn-tiny" and card["modality"] == "CT"
    assert card["classes"] == ["noncovid", "covid"] and len(card["lesions"]) == 5
    assert card["backend"] == "onnxruntime" and card["heatmaps"] and card["threshold"] == pytest.approx(0.4)
    assert "not for diagnosis" in card["intended_use"] and card["metrics"]["validation"]["auc"] == 0.5
    assert "/api/v1/predict" in service.get("/openapi.json").json()["paths"]
    assert TestClient(service.app).get("/openapi.json").status_code == 401  # the API's map needs a key too


def test_predict_matches_pytorch_and_is_recorded(service, ct_png, tiny_models_dir):
    res = service.post("/api/v1/predict", files={"file": ("slice.png", ct_png, "image/png")},
                       data={"model": "ladnn-tiny", "overlay": "true"})
    assert res.status_code == 200, res.text
    body = res.json()
    p = body["probabilities"]["covid"]
    assert p + body["probabilities"]["noncovid"] == pytest.approx(1)
    assert body["prediction"] == ("covid" if p >= 0.4 else "noncovid") and body["threshold"] == pytest.approx(0.4)
    reference = Predictor(tiny_models_dir / "ladnn-tiny.pt").predict_source(ct_png, name="slice.png")
    assert p == pytest.approx(reference["probabilities"]["covid"], abs=1e-4)  # ONNX Runtime == PyTorch
    assert body["lesions"] == pytest.approx(reference["lesions"], abs=1e-4)
    assert body["backend"] == "onnxruntime" and body["timings_ms"]["total"] > 0
    for key in ("image_png", "heatmap_png", "overlay_png"):
        assert _png(body["heatmap"][key]).shape[:2] == (64, 64)
    # the heat map PNG is indexed, its palette the JET colours of the map's levels; the overlay is the
    # blend of the image and those colours
    from PIL import Image

    from chestdx.explain.render import overlay_rgb

    indexed = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["heatmap_png"].split(",", 1)[1])))
    assert indexed.mode == "P" and indexed.size == (64, 64)
    levels = np.asarray(indexed)  # the palette indices: the map's levels 0-255
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    assert np.array_equal(np.asarray(indexed.convert("RGB")), jet[levels]) and levels.max() == 255
    grey = _png(body["heatmap"]["image_png"])
    assert grey.shape == (64, 64)
    blend = overlay_rgb(grey / 255.0, levels / 255.0)
    assert np.abs(_png(body["heatmap"]["overlay_png"])[..., ::-1].astype(int) - blend).max() <= 1
    plain = service.post("/api/v1/predict", files={"file": ("slice.png", ct_png, "image/png")},
                         data={"model": "ladnn-tiny"}).json()["heatmap"]
    assert "overlay_png" not in plain and plain["heatmap_png"] == body["heatmap"]["heatmap_png"]
    study = service.get(body["study_url"]).json()
    assert study["id"] == body["study_id"] and study["probabilities"] == pytest.approx(body["probabilities"])
    assert study["input_format"] == "png" and "slice.png" not in str(study)  # file names are not stored


def test_dicom_is_deidentified_before_storing(service, tmp_path, ct_png):
    grey = cv2.imdecode(np.frombuffer(ct_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    # grey levels as HU around the lung window (-600 +- 750), so the model's window shows the image
    path = make_dicom(tmp_path / "patient.dcm", grey.astype(np.uint16) * 6, intercept=-1350)
    res = service.post("/api/v1/predict", files={"file": ("Test_Patient.dcm", path.read_bytes())},
                       data={"heatmap": "false"})
    assert res.status_code == 200, res.text
    assert "heatmap" not in res.json()
    study = service.app.state.db.get(res.json()["study_id"])
    stored = pydicom.dcmread(io.BytesIO(study.image), force=True)
    assert "PatientName" not in stored and "PatientID" not in stored
    assert stored.Modality == "CT" and stored.pixel_array.shape == grey.shape  # the image itself is kept
    assert b"Test^Patient" not in study.image and "Test" not in str(study.as_dict())


def test_batch_keeps_going_past_a_bad_file(service, ct_png):
    files = [("files", ("a.png", ct_png)), ("files", ("notes.txt", b"hello")), ("files", ("b.png", ct_png))]
    body = service.post("/api/v1/predict/batch", files=files).json()
    assert [r["status"] for r in body["results"]] == [200, 415, 200]
    assert "not a supported image" in body["results"][1]["error"]
    ids = [r["study_id"] for r in body["results"] if r["status"] == 200]
    assert all(service.get(f"/api/v1/studies/{i}").status_code == 200 for i in ids)


def _dicom_without_pixels(tmp_path) -> bytes:
    path = make_dicom(tmp_path / "x.dcm", np.zeros((32, 32), np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    return path.read_bytes()


@pytest.mark.parametrize("case,status,words", [
    ("too_big_file", 413, "larger than the 1 MB limit"),
    ("too_many_pixels", 413, "too large"),
    ("not_an_image", 415, "not a supported image"),
    ("corrupt_png", 422, "corrupt"),
    ("dicom_no_pixels", 422, "no pixel data"),
    ("empty", 400, "empty file"),
    ("blank_16bit", 422, "not a chest image"),
    ("photograph", 422, "not a chest image"),
    ("unknown_model", 404, "unknown model 'nope'"),
    ("no_file", 422, "file"),
])
def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_serving(service, ct_png, tmp_path, case, status, words):
    big = np.random.default_rng(0).integers(0, 255, (2100, 2100), np.uint8)  # 4.4 MP > 4 MP limit
    uploads = {
        "too_big_file": b"\x89PNG\r\n\x1a\n" + b"\0" * (1024 * 1024 + 10),
        "too_many_pixels": cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 5])[1].tobytes(),
        "not_an_image": b"%PDF-1.4 not an image",
        "corrupt_png": ct_png[:200],
        "dicom_no_pixels": None,
        "empty": b"",
        "blank_16bit": cv2.imencode(".png", np.zeros((512, 512), np.uint16))[1].tobytes(),
        "photograph": cv2.imencode(".jpg", skimage_data.astronaut()[..., ::-1])[1].tobytes(),
    }
    data = {"model": "nope"} if case == "unknown_model" else {}
    if case == "no_file":
        res = service.post("/api/v1/predict", data=data)
    else:
        content = _dicom_without_pixels(tmp_path) if case == "dicom_no_pixels" else uploads.get(case, ct_png)
        res = service.post("/api/v1/predict", files={"file": ("upload.bin", content)}, data=data)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["status"] == status and words in error["message"]
    assert service.post("/api/v1/predict", files={"file": ("ok.png", ct_png)}).status_code == 200


def test_unknown_study_and_web_page(service):
    res = service.get("/api/v1/studies/does-not-exist")
    assert res.status_code == 404 and "no study" in res.json()["error"]["message"]
    page = service.get("/")
    assert page.status_code == 200 and "Research use only, not for diagnosis" in page.text
    assert 'id="files"' in page.text and 'id="login-form"' in page.text
    # The page passes its own CSP: no inline script or style, scripts only from the service itself.
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<style" not in page.text and " style=" not in page.text and "<script>" not in page.text
    script = service.get("/static/app.js")
    assert script.status_code == 200 and "opacity" in script.text and "X-CSRF-Token" in script.text
    assert service.get("/static/../db.py").status_code == 404 and service.get("/static/index.html").status_code == 404


def test_onnx_export_matches_pytorch_on_real_images(tiny_models_dir, covid_ct_dir, tmp_path):
    onnx_path = export_onnx(tiny_models_dir / "ladnn-tiny.pt", tmp_path / "m.onnx")
    torch_p, onnx_p = Predictor(tiny_models_dir / "ladnn-tiny.pt"), Predictor(onnx_path)
    assert onnx_p.backend == "onnxruntime" and onnx_p.bundle["classes"] == ["noncovid", "covid"]
    assert onnx_p.bundle["tta_scales"] == torch_p.bundle["tta_scales"] == [1.0] and onnx_p.tta  # views travel along
    import torch

    from chestdx.data.io import read_image

    images = sorted((covid_ct_dir / "images").rglob("*.png"))[::97][:6]
    x = torch.cat([torch_p.preprocess(read_image(p).to_gray()) for p in images])
    with torch.no_grad():
        expected = torch_p.model(x)
    got = onnx_p.model(x)  # a batch of 6 through the dynamic batch axis
    for key in ("logits", "lesion_logits"):
        assert torch.allclose(got[key], expected[key], atol=1e-4)


def test_service_heat_maps_come_in_closed_form_and_equal_the_backward_pass(service, ct_png):
    from chestdx.data.io import decode_image
    from chestdx.explain import explain

    served = service.app.state.models["ladnn-tiny"]
    assert served.closed_form("gradcam++") and served.card()["heatmap_backend"].startswith("closed form")
    _, x = served.predictor.prepare(decode_image(ct_png, "x.png").to_gray())
    spread = []
    for target in ("covid", "noncovid"):
        fast = served.heatmap(x, "gradcam++", target)
        slow = explain(served.explainer.model, x, "gradcam++", target, served.explainer.explain_heads).maps[0, 0]
        assert np.abs(fast - slow).max() < 1e-3
        spread.append(fast.std())
    assert max(spread) > 0.01  # not two blank maps agreeing
    body = service.post("/api/v1/predict", files={"file": ("s.png", ct_png)}).json()
    assert body["heatmap"]["computed"] == "closed form from the ONNX features"
    assert served.heatmap_target(body["prediction"]) == body["prediction"]  # the verdict's class, not the argmax


def test_png_metadata_is_stripped_before_storing(service, ct_png):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", "Doe^Jane MRN12345")
    buf = io.BytesIO()
    Image.open(io.BytesIO(ct_png)).save(buf, "PNG", pnginfo=info)
    assert b"Doe^Jane" in buf.getvalue()
    res = service.post("/api/v1/predict", files={"file": ("a.png", buf.getvalue())}, data={"heatmap": "false"})
    assert res.status_code == 200, res.text
    study = service.app.state.db.get(res.json()["study_id"])
    assert study.image_media_type == "image/png" and b"Doe^Jane" not in study.image
    stored, sent = (np.asarray(Image.open(io.BytesIO(b))) for b in (study.image, buf.getvalue()))
    assert np.array_equal(stored, sent)  # the pixels themselves are kept
