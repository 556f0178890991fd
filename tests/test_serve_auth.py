"""Who may do what in the service: API keys and scopes, login sessions with CSRF, organisations,
the audit log, safe headers, body limits, one error schema, migrations on SQLite and PostgreSQL."""

import asyncio
import json
import subprocess

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from chestdx.serve.app import ServiceSettings, create_app
from chestdx.serve.security import RequestGuard

from tests.test_cli import CHESTDX

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def ct_png(covid_ct_dir) -> bytes:
    return sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[0].read_bytes()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app(request, tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    url = f"sqlite:///{root / 'db.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    application = create_app(ServiceSettings(models_dir=tiny_models_dir, db_url=url, cache_dir=root / "cache",
                                             max_batch_files=3, cors_origins=("https://viewer.example",)))
    accounts = application.state.accounts
    suffix = request.param  # one PostgreSQL server is shared by the test modules
    application.state.keys = {
        "a": accounts.create_key(f"a-{suffix}", ["predict", "read"])[0],
        "a_predict": accounts.create_key(f"a-{suffix}", ["predict"])[0],
        "a_read": accounts.create_key(f"a-{suffix}", ["read"])[0],
        "b": accounts.create_key(f"b-{suffix}", ["predict", "read"])[0],
        "admin": accounts.create_key(f"ops-{suffix}", ["admin"])[0],
    }
    application.state.user = f"alice-{suffix}"
    accounts.add_user(application.state.user, PASSWORD, f"a-{suffix}")
    return application


def client(app, key=None) -> TestClient:
    return TestClient(app, headers={"X-API-Key": app.state.keys[key]} if key else {})


def post_image(c: TestClient, png: bytes, **kw):
    return c.post("/api/v1/predict", files={"file": ("x.png", png)}, data={"heatmap": "false"}, **kw)


def test_every_data_route_needs_a_key_or_a_login(app, ct_png):
    anon = client(app)
    for method, path in [("get", "/api/v1/models"), ("get", "/api/v1/studies/x"), ("get", "/openapi.json"),
                         ("get", "/docs"), ("get", "/api/v1/me")]:
        res = getattr(anon, method)(path)
        assert res.status_code == 401 and res.json()["error"]["status"] == 401, path
        assert res.headers["www-authenticate"] == "Bearer"
    assert post_image(anon, ct_png).status_code == 401
    bad = TestClient(app, headers={"Authorization": "Bearer cdx_not-a-key"})
    assert bad.get("/api/v1/models").json()["error"]["message"] == "invalid or revoked API key"
    assert anon.get("/healthz").status_code == 200  # load balancers probe without a key
    assert client(app, "a").get("/api/v1/models").status_code == 200
    assert TestClient(app, headers={"Authorization": f"Bearer {app.state.keys['a']}"}).get(
        "/api/v1/models").status_code == 200


def test_scopes_and_organisations(app, ct_png):
    created = post_image(client(app, "a_predict"), ct_png)
    assert created.status_code == 200, created.text
    study = created.json()["study_url"]
    assert client(app, "a_predict").get(study).status_code == 403  # predict alone does not read
    assert post_image(client(app, "a_read"), ct_png).status_code == 403
    assert client(app, "a_read").get(study).status_code == 200  # same organisation
    other = client(app, "b").get(study)
    assert other.status_code == 404 and "no study" in other.json()["error"]["message"]  # not even "forbidden"
    assert client(app, "admin").get(study).status_code == 200
    log = app.state.db.audit_log(20)
    study_id = created.json()["study_id"]
    actions = {(e.action, e.actor[:8]) for e in log if e.study_id == study_id}
    assert ("create", "key:cdx_") in actions and ("read", "key:cdx_") in actions
    assert ("read_denied", "key:cdx_") in actions


def test_revoked_key_is_refused_at_once(app):
    accounts = app.state.accounts
    secret, key = accounts.create_key("revoke-me", ["read"])
    c = TestClient(app, headers={"X-API-Key": secret})
    assert c.get("/api/v1/models").status_code == 200
    accounts.revoke_key(key.prefix)
    assert c.get("/api/v1/models").status_code == 401


def test_secrets_are_stored_only_as_hashes(app):
    with app.state.db.engine.connect() as conn:
        dump = json.dumps([list(map(str, r)) for t in ("api_keys", "users", "sessions")
                           for r in conn.execute(text(f"SELECT * FROM {t}"))])
    assert all(secret not in dump for secret in app.state.keys.values())
    assert PASSWORD not in dump and "$argon2id$" in dump


def test_login_session_with_csrf_and_logout(app, ct_png):
    c = client(app)
    assert c.post("/api/v1/login", json={"username": app.state.user, "password": "wrong password"}).status_code == 401
    res = c.post("/api/v1/login", json={"username": app.state.user, "password": PASSWORD})
    assert res.status_code == 200, res.text
    cookie = res.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    csrf = res.json()["csrf_token"]
    assert c.get("/api/v1/me").json()["actor"] == f"user:{app.state.user}"
    no_token = post_image(c, ct_png)
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["error"]["message"]
    assert post_image(c, ct_png, headers={"X-CSRF-Token": "forged"}).status_code == 403
    cross_site = post_image(c, ct_png, headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert cross_site.status_code == 403
    ok = post_image(c, ct_png, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200
    assert c.get(ok.json()["study_url"]).status_code == 200
    assert client(app, "b").get(ok.json()["study_url"]).status_code == 404
    assert c.post("/api/v1/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert c.get("/api/v1/me").status_code == 401
    actions = [e.action for e in app.state.db.audit_log(50) if e.actor == f"user:{app.state.user}"]
    assert {"login", "login_failed", "logout", "create"} <= set(actions)


def test_deactivated_user_cannot_log_in(app):
    accounts = app.state.accounts
    accounts.add_user(f"bob-{app.state.user}", PASSWORD, "bobs")
    accounts.deactivate_user(f"bob-{app.state.user}")
    res = client(app).post("/api/v1/login", json={"username": f"bob-{app.state.user}", "password": PASSWORD})
    assert res.status_code == 401


def test_safe_headers_on_pages_api_and_errors(app):
    c = client(app, "a")
    for res in (c.get("/"), c.get("/api/v1/models"), c.get("/no/such/route"), client(app).get("/api/v1/models")):
        assert res.headers["x-content-type-options"] == "nosniff"
        assert res.headers["x-frame-options"] == "DENY" and res.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in res.headers["content-security-policy"]
    assert c.get("/api/v1/models").headers["cache-control"] == "no-store"


def test_cors_only_for_configured_origins(app):
    c = client(app, "a")
    evil = c.get("/api/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in evil.headers
    ok = c.get("/api/v1/models", headers={"Origin": "https://viewer.example"})
    assert ok.headers["access-control-allow-origin"] == "https://viewer.example"


def test_one_error_schema(app, ct_png):
    c = client(app, "a")
    cases = [c.get("/no/such/route"), c.put("/api/v1/predict"), c.delete("/api/v1/models"),
             c.post("/api/v1/predict/batch", files=[("files", (f"{k}.png", ct_png)) for k in range(4)]),
             c.post("/api/v1/login", json={"user": "x"}), c.post("/api/v1/login", content=b"{not json")]
    for res in cases:
        body = res.json()
        assert set(body) == {"error"} and set(body["error"]) == {"status", "message", "file"}, body
        assert body["error"]["status"] == res.status_code and 400 <= res.status_code < 500
    assert cases[3].status_code == 413 and "at most 3" in cases[3].json()["error"]["message"]
    long_name = c.post("/api/v1/predict", files={"file": ("x" * 1000 + ".txt", b"hello")})
    assert long_name.status_code == 415 and len(long_name.json()["error"]["file"]) <= 120
    longer = c.post("/api/v1/predict", files={"file": ("x" * 5000 + ".txt", b"hello")})
    assert longer.status_code == 400 and "multipart form could not be parsed" in longer.json()["error"]["message"]


def _asgi(guard: RequestGuard, headers, receive):
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/predict", "headers": headers, "scheme": "http"}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_oversized_body_is_refused_from_its_header_before_reading():
    async def inner(scope, receive, send):  # would read the body
        await receive()
        raise AssertionError("the route ran")

    async def receive():
        raise AssertionError("the body was read")

    status, body = _asgi(RequestGuard(inner, 1024, 5), [(b"content-length", str(5 * 2**30).encode())], receive)
    assert status == 413 and "5120 MB" in body["error"]["message"]


def test_chunked_body_over_the_limit_and_a_stalled_body():
    async def reader(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    chunks = iter([{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 3)

    async def chunked():
        return next(chunks)

    assert _asgi(RequestGuard(reader, 1024, 5), [], chunked)[0] == 413

    async def stalled():
        await asyncio.sleep(10)

    status, body = _asgi(RequestGuard(reader, 1024, 0.2), [], stalled)
    assert status == 408 and "0.2 s" in body["error"]["message"]


def test_migrations_match_the_models_and_upgrade_an_old_database(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from chestdx.serve.db import Base, Database
    from chestdx.serve.migrate import current, head, upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    upgrade(old, "0001")  # the schema before accounts existed, with one study in it
    with old.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))  # as `create_all` made it: no version table
        conn.execute(text("INSERT INTO studies VALUES ('s1', '2025-01-01', 'm', 'h', 'png', 'covid', 0.5, '{}', "
                          "NULL, NULL)"))
    db = Database(url)
    assert current(db.engine) == head()
    assert db.get("s1").prediction == "covid" and db.get("s1").org_id is None
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_two_services_share_one_postgresql(tiny_models_dir, tmp_path, postgres_url, ct_png):
    apps = [create_app(ServiceSettings(models_dir=tiny_models_dir, db_url=postgres_url, cache_dir=tmp_path / "c"))
            for _ in range(2)]
    secret, _ = apps[0].state.accounts.create_key("shared-org", ["predict", "read"])
    first, second = (TestClient(a, headers={"X-API-Key": secret}) for a in apps)
    made = post_image(first, ct_png).json()
    assert second.get(made["study_url"]).json()["probabilities"] == pytest.approx(made["probabilities"])
    assert apps[1].state.db.server.startswith("PostgreSQL")


def test_users_and_keys_commands(tmp_path):
    from tests.test_cli import run

    db = f"sqlite:///{tmp_path / 'cli.db'}"
    added = subprocess.run([*CHESTDX, "users", "add", "carol", "--org", "clinic", "--password-stdin", "--db", db],
                           input=PASSWORD + "\n", capture_output=True, text=True, timeout=120)
    assert added.returncode == 0 and "carol added to clinic" in added.stdout, added.stderr
    short = subprocess.run([*CHESTDX, "users", "add", "dave", "--org", "clinic", "--password-stdin", "--db", db],
                           input="short\n", capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "at least 10 characters" in short.stderr and "Traceback" not in short.stderr
    made = run(["keys", "create", "--org", "clinic", "--scope", "read", "--name", "pacs", "--db", db], tmp_path)
    secret = made.stdout.strip()
    assert secret.startswith("cdx_") and "not shown again" in made.stderr
    listing = run(["keys", "list", "--db", db], tmp_path).stdout
    assert secret[:12] in listing and secret not in listing and "pacs" in listing
    run(["keys", "revoke", secret[:12], "--db", db], tmp_path)
    from chestdx.serve.auth import Accounts
    from chestdx.serve.db import Database

    accounts = Accounts(Database(db))
    assert accounts.by_key(secret) is None and accounts.login("carol", PASSWORD) is not None
    log = run(["audit", "--db", db], tmp_path).stdout
    assert "key_revoked" in log and "user_added" in log
    bad_scope = run(["keys", "create", "--org", "x", "--scope", "root", "--db", db], tmp_path, check=False)
    assert bad_scope.returncode == 2 and "scopes must be among" in bad_scope.stderr


def test_no_auth_only_on_loopback(tmp_path):
    from tests.test_cli import run

    res = run(["serve", "--no-auth", "--host", "0.0.0.0", "--models", str(tmp_path)], tmp_path, check=False)
    assert res.returncode == 2 and "only with --host 127.0.0.1" in res.stderr and "Traceback" not in res.stderr


def test_nul_and_oversized_values_get_a_4xx_on_every_database(app):
    c = client(app, "a")
    assert c.get("/api/v1/studies/a%00b").status_code == 404
    login = client(app).post("/api/v1/login", json={"username": "al\u0000ice", "password": "x"})
    assert login.status_code == 422 and login.json()["error"]["status"] == 422
    huge = client(app).post("/api/v1/login", json={"username": "alice", "password": "x" * 5000})
    assert huge.status_code == 422


def test_anonymous_post_is_refused_before_its_body_is_read():
    async def inner(scope, receive, send):
        raise AssertionError("the route ran")

    async def receive():
        raise AssertionError("the body was read")

    status, body = _asgi(RequestGuard(inner, 2**20, 5, require_credentials=True), [], receive)
    assert status == 401 and "authentication required" in body["error"]["message"]


def test_a_trickling_body_is_cut_off_at_one_deadline():
    async def reader(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    status, _ = _asgi(RequestGuard(reader, 2**20, 0.3, min_rate_bytes_s=1000), [], trickle)
    assert status == 408  # each byte arrives well within 0.3 s, the body as a whole does not


def test_without_auth_only_this_machine_is_served(tiny_models_dir, tmp_path):
    app = create_app(ServiceSettings(models_dir=tiny_models_dir, db_url=f"sqlite:///{tmp_path / 'n.db'}",
                                     cache_dir=tmp_path / "c", auth=False))
    assert TestClient(app).get("/api/v1/models").status_code == 200
    remote = TestClient(app, client=("10.1.2.3", 5000)).get("/api/v1/models")
    assert remote.status_code == 403 and "this machine only" in remote.json()["error"]["message"]
    cross = TestClient(app).post("/api/v1/predict", files={"file": ("x.png", b"x")},
                                 headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403


def test_health_answers_head_and_get_without_a_key(app):
    anon = client(app)
    assert anon.head("/healthz").status_code == 200 and anon.get("/healthz").json()["status"] == "ok"
