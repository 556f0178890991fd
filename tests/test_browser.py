"""A real browser (Debian's chromium, driven by Playwright) uses the web page end to end: log in,
upload, read the result, download the CSV, log out, all under the page's Content-Security-Policy.

CI installs chromium with apt (.ci/run); elsewhere the test is skipped when no chromium exists.
The screenshot goes to test-artifacts/browser_result.png.
"""

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from chestdx.serve.app import ServiceSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Without these flags chromium keeps calling Google's hosts, which this closed network refuses.
PASSWORD = "a long test password"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    app = create_app(ServiceSettings(models_dir=tiny_models_dir, db_url=f"sqlite:///{root / 'db.sqlite'}",
                                     cache_dir=root / "cache"))
    app.state.accounts.add_user("radiologist", PASSWORD, "clinic")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_upload_in_chromium_shows_probability_and_overlay(server, covid_ct_dir, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"chromium not found at {CHROMIUM}; .ci/run installs it with apt")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    image = sorted((covid_ct_dir / "images" / "covid").glob("*.png"))[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        # Records every CSP violation in the page (the init script itself runs outside the page's CSP).
        page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', "
                             "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
        page.goto(server)
        page.wait_for_selector("#login-form", state="visible")
        assert not page.is_visible("#app")  # nothing but the login before a login
        page.fill("#username", "radiologist")
        page.fill("#password", "wrong password")
        page.click("#login-button")
        page.wait_for_selector("#login-error:has-text('wrong user name or password')")
        page.fill("#password", PASSWORD)
        page.click("#login-button")
        page.wait_for_selector("#model option[value='ladnn-tiny']", state="attached")
        assert page.inner_text("#who-name") == "radiologist"
        assert "Research use only" in page.inner_text("#notice")
        page.set_input_files("#files", str(image))
        page.wait_for_selector(".result .prob-value", timeout=60_000)
        values = [float(v) for v in page.locator(".result .bar.class .prob-value").all_inner_texts()]
        assert len(values) == 2 and sum(values) == pytest.approx(1, abs=2e-3)
        assert re.fullmatch(r"(covid|noncovid)", page.inner_text("[data-testid=prediction]").strip())
        heat = page.locator(".overlay img.heat")
        assert heat.get_attribute("src").startswith("data:image/png;base64,")
        assert page.evaluate("document.querySelector('.overlay img.heat').naturalWidth") == 64  # it decoded
        page.locator("input.opacity").fill("0.8")
        assert heat.evaluate("img => img.style.opacity") == "0.8"
        assert len(page.locator(".bar.lesion").all()) == 5
        with page.expect_download() as download:
            page.click("#csv")
        csv_text = Path(download.value.path()).read_text()
        assert csv_text.splitlines()[0].startswith("file,study_id,prediction") and image.name in csv_text
        formula = tmp_path / "=HYPERLINK(1).png"  # a file name a spreadsheet would run as a formula
        formula.write_bytes(image.read_bytes())
        page.set_input_files("#files", str(formula))
        page.wait_for_selector(".result[data-file='=HYPERLINK(1).png']")
        with page.expect_download() as download:
            page.click("#csv")
        lines = Path(download.value.path()).read_text().splitlines()
        assert any(line.startswith("'=HYPERLINK(1).png,") for line in lines), lines  # shown, not run
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser_result.png"), full_page=True)
        assert page.evaluate("window.__csp") == []  # the page works under its own CSP
        injected = page.evaluate("() => { const s = document.createElement('script'); s.textContent = "
                                 "'window.__ran = 1'; document.body.append(s); return window.__ran; }")
        assert injected is None and page.evaluate("window.__csp.length") == 1  # and the CSP is enforced
        page.click("#logout")
        page.wait_for_selector("#login-form", state="visible")
        assert page.inner_text("#login-error") == "Logged out." and not page.is_visible("#app")
        status = page.evaluate("fetch('/api/v1/models').then(r => r.status)")
        assert status == 401  # the session is gone on the server, not just hidden in the page
        browser.close()
    assert (ARTIFACTS / "browser_result.png").stat().st_size > 10_000
