"""The service as an attacker or a careless client uses it: every hostile file of tests/hostile.py
and abuse of HTTP itself. Zero 5xx, one error schema, the file named, and the service keeps serving."""

import pytest
from fastapi.testclient import TestClient

from chestdx.serve.app import ServiceSettings, create_app


@pytest.fixture(scope="module")
def ct_png(covid_ct_dir) -> bytes:
    return sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[0].read_bytes()


@pytest.fixture(scope="module")
def service(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    app = create_app(ServiceSettings(models_dir=tiny_models_dir, db_url=f"sqlite:///{root / 'db.sqlite'}",
                                     cache_dir=root / "cache", store_images=True))
    secret, _ = app.state.accounts.create_key("clinic", ["predict", "read"])
    with TestClient(app, headers={"X-API-Key": secret}, raise_server_exceptions=False) as client:
        yield client


def assert_clean_error(res, status=None):
    assert 400 <= res.status_code < 500, (res.status_code, res.text[:300])
    body = res.json()
    assert set(body) == {"error"} and body["error"]["status"] == res.status_code
    assert "Traceback" not in res.text and "\n" not in body["error"]["message"]
    if status is not None:
        assert res.status_code == status, body


def test_every_hostile_file_gets_a_clear_4xx(service, ct_png, tmp_path):
    from tests.hostile import hostile_corpus

    corpus = hostile_corpus(tmp_path)
    assert len(corpus) >= 60
    for case in corpus:
        res = service.post("/api/v1/predict", files={"file": (case.filename, case.data)}, data={"heatmap": "true"})
        assert_clean_error(res)
        error = res.json()["error"]
        # the file is named, except where the form itself cannot be parsed (a 5000-character name)
        assert error["file"] or "multipart form could not be parsed" in error["message"], case.kind
    assert service.post("/api/v1/predict", files={"file": ("ok.png", ct_png)}).status_code == 200


@pytest.mark.parametrize("case", ["json_body", "no_boundary", "garbage_multipart", "two_files", "empty_form",
                                  "file_as_text_field", "heatmap_not_bool", "study_id_traversal", "study_id_sql",
                                  "study_id_huge", "model_injection", "head_on_predict", "options", "query_junk",
                                  "bad_content_length", "huge_content_length", "wrong_auth_scheme",
                                  "key_with_newline", "huge_cookie_session"])
def test_http_abuse_gets_a_clear_4xx(service, ct_png, case):
    c = service
    if case == "json_body":
        res = c.post("/api/v1/predict", json={"file": "x"})
    elif case == "no_boundary":
        res = c.post("/api/v1/predict", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    elif case == "garbage_multipart":
        res = c.post("/api/v1/predict", content=b"\x00\xff" * 500,
                     headers={"Content-Type": "multipart/form-data; boundary=zz"})
    elif case == "two_files":  # the second part of the same name is ignored or refused, never a crash
        res = c.post("/api/v1/predict", files=[("file", ("a.png", ct_png)), ("file", ("b.txt", b"x"))])
        assert res.status_code in (200, 415, 422), res.text
        return
    elif case == "empty_form":
        res = c.post("/api/v1/predict", data={})
    elif case == "file_as_text_field":
        res = c.post("/api/v1/predict", data={"file": "not an upload"})
    elif case == "heatmap_not_bool":
        res = c.post("/api/v1/predict", files={"file": ("a.png", ct_png)}, data={"heatmap": "maybe"})
    elif case == "study_id_traversal":
        res = c.get("/api/v1/studies/..%2F..%2Fetc%2Fpasswd")
    elif case == "study_id_sql":
        res = c.get("/api/v1/studies/' OR '1'='1")
    elif case == "study_id_huge":
        res = c.get("/api/v1/studies/" + "a" * 5000)
    elif case == "model_injection":
        res = c.post("/api/v1/predict", files={"file": ("a.png", ct_png)}, data={"model": "../../etc/passwd"})
    elif case == "head_on_predict":
        res = c.head("/api/v1/predict")
        assert res.status_code == 405
        return
    elif case == "options":
        res = c.options("/api/v1/predict")
    elif case == "query_junk":
        res = c.get("/api/v1/studies/x?%00=%ff&a=" + "b" * 3000)
    elif case == "bad_content_length":
        res = c.post("/api/v1/predict", content=b"abc", headers={"Content-Length": "abc"})
    elif case == "huge_content_length":
        res = c.post("/api/v1/predict", content=b"abc", headers={"Content-Length": str(5 * 2**30)})
    elif case == "wrong_auth_scheme":
        res = TestClient(c.app).get("/api/v1/models", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
    elif case == "key_with_newline":
        res = TestClient(c.app).get("/api/v1/models", headers={"X-API-Key": "cdx_" + "a" * 5000})
    elif case == "huge_cookie_session":
        res = TestClient(c.app, cookies={"chestdx_session": "x" * 3000}).get("/api/v1/models")
    assert_clean_error(res)
    assert c.post("/api/v1/predict", files={"file": ("ok.png", ct_png)}, data={"heatmap": "false"}).status_code == 200
