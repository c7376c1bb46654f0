"""The review page (`GET /`, serving/review_page.py) in a real Chromium, against `xray-ray serve` with a token.

One `xray-ray serve` for the module (a small trained model, a token file, a free loopback
port) and one headless Chromium: Debian's `chromium` driven by Playwright through its
executable path (Playwright downloads no browser here; `make test` installs the system
package). Each test opens a fresh browser context, so the page has to ask for the token
each time, as after a reload. Every test also requires that the page ran under its
Content-Security-Policy without a violation and without a script error. Screenshots of
the four states (an answer, a heat map, an OOD warning, an error) go to reports/ui/.

The first test without a browser checks the page as served: static, with a strict policy
whose hashes admit exactly its own style sheet and script, no external URL, no HTML sink.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import REPO
from tests.nonchest import document
from tests.running import Command, healthy, user_env
from xray_ray.config import CLASS_NAMES
from xray_ray.images import synth
from xray_ray.processes import free_port

pytestmark = pytest.mark.timeout(900)  # the first test also trains the session's compact model and starts Serve

TOKEN = "review-page-test-token-7f3a9c"
SCREENSHOTS = REPO / "reports" / "ui"
XSS_NAME = "<img src=x onerror=alert(1)>.png"
EXPECT_MS = 60_000
VIEWPORT = {"width": 1280, "height": 960}

# Watches every page: CSP violations (none expected: the page needs no exception to its policy) and whether
# any injected script ran (it sets the flag).
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push(e.violatedDirective + " " + (e.blockedURI || "") + " " + (e.sample || ""));
});
"""


# --- the page as served, without a browser (fast) -----------------------------------------------------------------

def _sha256_source(text: str) -> str:
    import base64
    import hashlib

    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_page_is_static_under_a_strict_policy_with_no_external_url():
    from xray_ray.serving.app import api
    from xray_ray.serving.review_page import review_page

    def routes(router) -> list[tuple[str, set[str]]]:  # Serve's ingress moves the class's routes into a sub-router
        found = []
        for route in router.routes:
            inner = getattr(route, "original_router", None)
            here = [(getattr(route, "path", ""), getattr(route, "methods", set()))]
            found += routes(inner) if inner is not None else here
        return found

    assert ("/", {"GET"}) in routes(api.router)
    response = review_page()
    html = response.body.decode()
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert response.headers["content-type"].startswith("text/html")
    assert policy["default-src"] == "'none'" and policy["img-src"] == "'self' data: blob:"
    assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["require-trusted-types-for"] == "'script'"
    assert "unsafe" not in response.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(scripts) == len(styles) == 1, "one inline script and one style sheet, admitted by their hashes"
    assert policy["script-src"] == _sha256_source(scripts[0]) and policy["style-src"] == _sha256_source(styles[0])
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*stylesheet|@import|url\(", html), "nothing loaded"
    assert not re.search(r"(?i)\b(?:https?|wss?|ftp):|//[a-z0-9-]+\.[a-z0-9.-]+", html), "an external URL"
    assert set(re.findall(r"\b(?:src|href)=\"([^\"]*)\"", html)) <= {"data:,", "#"}
    assert not re.search(r"\son[a-z]+\s*=", html.split("<script>")[0]), "no inline event handler"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "localStorage", "sessionStorage", "document.cookie"):
        assert sink not in scripts[0], f"the script uses {sink}"
    assert "Research use only. Not a medical device." in html
    for state in ('id="ood-warning"', 'id="heat-toggle"', 'id="download-json"', 'id="download-png"',
                  'id="token-input"', 'id="error-reason"', "calibrated on the validation images"):
        assert state in html


# --- the browser and the server -----------------------------------------------------------------------------------

def chromium_path() -> str | None:
    given = os.environ.get("XRAY_RAY_CHROMIUM")
    return given if given and Path(given).is_file() else shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module: the system's, never a downloaded one."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium on this machine: `make test` installs the Debian package (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency: make setup")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(browser, compact_model, tmp_path_factory):
    """`xray-ray serve` on a free loopback port with a token file; stopped (Ctrl-C, then by pid) after the module."""
    folder = tmp_path_factory.mktemp("review_page")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    (folder / "home").mkdir()
    port = free_port()
    command = Command(["serve", "--model", str(compact_model[0]), "--port", str(port), "--token-file", str(token_file),
                       "--num-cpus", "0.5"], folder / "serve.log", folder,
                      env=user_env(XRAY_RAY_METRICS_PORT=str(free_port()), HOME=str(folder / "home")))
    url = f"http://127.0.0.1:{port}"

    try:
        command.wait_for(lambda: healthy(url), 300, "a healthy replica")
        yield url
        command.stop("interrupt")
    finally:
        command.kill()


def ask(url: str, data: bytes) -> dict:
    """The API's own answer for `data` (with the token), to choose test images."""
    response = httpx.post(f"{url}/predict", files={"file": ("x.png", data)},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def real_xray(server, real_root) -> tuple[Path, dict]:
    """A real X-ray from the shared sample set, with the API's answer: one the model does not flag out of
    distribution when there is one (the compact model learned from phantoms: it flags every real film seen so far)."""
    paths = [real_root / path for path in pd.read_csv(real_root / "index.csv").groupby("label").head(2)["file_path"]]
    answers = [(path, ask(server, path.read_bytes())) for path in paths]
    return next(((path, answer) for path, answer in answers if not answer["out_of_distribution"]), answers[0])


@pytest.fixture(scope="module")
def phantom_png(server) -> bytes:
    """A phantom chest X-ray (the model's own kind of image) that the model does not flag out of distribution."""
    for seed in range(20):
        data = png_bytes(synth.phantom("COVID", 256, np.random.default_rng([seed, 7])))
        if not ask(server, data)["out_of_distribution"]:
            return data
    raise AssertionError("every phantom was flagged out of distribution")


@pytest.fixture(scope="module")
def document_png(server) -> bytes:
    """A generated scanned page that the model flags out of distribution."""
    pages = [png_bytes(document(np.random.default_rng([seed, 99]))) for seed in range(6)]
    flagged = [data for data in pages if ask(server, data)["out_of_distribution"]]
    assert flagged, "the model flagged none of 6 generated document pages"
    return flagged[0]


class Review:
    """One browser context on the page: its messages, its token, its uploads."""

    def __init__(self, browser, url: str) -> None:
        from playwright.sync_api import expect

        self.expect = expect
        self.context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        self.context.add_init_script(WATCH)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", self._console)
        response = self.page.goto(f"{url}/")
        assert response.status == 200 and "default-src 'none'" in response.headers["content-security-policy"]
        marking = re.compile(r"Research use only\. Not a medical device\.")
        self.expect(self.page.locator("#marking")).to_have_text(marking)

    def _console(self, message) -> None:
        """Console errors, except Chromium's note on each 4xx answer (refusals the tests ask for)."""
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def enter_token(self, token: str = TOKEN) -> None:
        self.expect(self.page.locator("#token-panel")).to_be_visible(timeout=EXPECT_MS)
        self.page.get_by_label("Token", exact=True).fill(token)
        self.page.get_by_role("button", name="Use token").click()

    def signed_in(self) -> Review:
        self.enter_token()
        self.expect(self.page.locator("#token-panel")).to_be_hidden(timeout=EXPECT_MS)
        self.expect(self.page.locator("#model-info")).to_contain_text("Model ", timeout=EXPECT_MS)
        return self

    def upload(self, name: str, data: bytes, mime: str = "image/png") -> None:
        self.page.locator("#file-input").set_input_files(files=[{"name": name, "mimeType": mime, "buffer": data}])

    def answered(self) -> None:
        self.expect(self.page.locator("#result")).to_be_visible(timeout=EXPECT_MS)
        self.expect(self.page.locator("#status")).to_have_text("Answered.", timeout=EXPECT_MS)

    def bars(self) -> list[tuple[str, float, float]]:
        """(class, the probability as shown in words, as held) of each bar."""
        rows = self.page.locator("#bars li")
        return [(rows.nth(i).locator(".bar-name").inner_text(),
                 float(rows.nth(i).locator(".bar-value").inner_text().rstrip(" %")) / 100,
                 float(rows.nth(i).get_attribute("data-probability"))) for i in range(rows.count())]

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        self.page.evaluate("window.scrollTo(0, 0)")  # scrolled, a full-page shot draws the sticky marking mid-page
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        """Fails the test when the page broke its policy, raised a script error or opened a dialog."""
        violations = self.page.evaluate("window.__violations")
        self.context.close()
        assert not violations, f"Content-Security-Policy violations: {violations}"
        assert not self.errors, f"script errors: {self.errors}"
        assert not self.dialogs, f"a script opened dialogs: {self.dialogs}"


@pytest.fixture
def review(browser, server):
    opened = Review(browser, server)
    yield opened
    opened.close()


def test_a_real_xray_shows_its_class_and_four_bars_summing_to_one(review, real_xray):
    path, expected = real_xray
    review.signed_in().upload(path.name, path.read_bytes())
    review.answered()
    page = review.page
    review.expect(page.locator("#file-name")).to_have_text(path.name)
    if expected["out_of_distribution"]:  # no real X-ray passed this phantom-trained model's detector
        review.expect(page.locator("#ood-warning")).to_be_visible()
        page.get_by_role("button", name="Show the class anyway").click()
    review.expect(page.locator("#label")).to_have_text(expected["label"])
    bars = review.bars()
    assert [name for name, _, _ in bars] == list(CLASS_NAMES)
    assert abs(sum(shown for _, shown, _ in bars) - 1) <= 0.01 and abs(sum(held for _, _, held in bars) - 1) <= 0.01
    for name, shown, held in bars:
        assert held == pytest.approx(expected["probabilities"][name], abs=1e-6) and abs(shown - held) <= 0.0005
    review.expect(page.locator("#calibration-note")).to_contain_text("calibrated on the validation images")
    review.expect(page.locator("#sha256")).to_have_text(expected["sha256"])
    review.expect(page.locator("#model-version")).to_have_text(expected["model_version"])
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the answer (JSON)").click()
    downloaded = json.loads(Path(download.value.path()).read_text())
    assert downloaded.keys() == expected.keys() and downloaded["sha256"] == expected["sha256"]
    assert downloaded["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    review.screenshot("answer.png")


def test_the_heat_map_toggle_lays_an_overlay_on_the_film_by_keyboard_alone(review, phantom_png):
    # a phantom: the compact test model learned from phantoms, and flags real X-rays, whose heat map is refused
    review.signed_in().upload("phantom_covid.png", phantom_png)
    review.answered()
    page = review.page
    toggle, overlay = page.locator("#heat-toggle"), page.locator("#overlay")
    review.expect(overlay).to_be_hidden()
    for _ in range(40):  # Tab through the page to the toggle, as a keyboard user does
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "heat-toggle":
            break
    else:
        raise AssertionError("the heat map toggle cannot be reached with the Tab key")
    page.keyboard.press("Enter")
    review.expect(overlay).to_be_visible(timeout=EXPECT_MS)
    review.expect(toggle).to_have_attribute("aria-pressed", "true")
    review.expect(toggle).to_have_text("Hide heat map")
    assert overlay.evaluate("img => img.complete && img.naturalWidth > 0 && img.src.startsWith('blob:')")
    review.expect(overlay).to_have_attribute("alt", re.compile(r"Heat map of .+ over the film"))

    page.locator("#opacity").focus()  # the opacity slider, by keyboard
    for _ in range(6):
        page.keyboard.press("ArrowLeft")
    review.expect(page.locator("#opacity-value")).to_have_text("70 %")
    assert overlay.evaluate("img => img.style.opacity") == "0.7"
    review.screenshot("heatmap.png")

    other = next(c for c in CLASS_NAMES if c != page.locator("#label").inner_text())
    first = overlay.get_attribute("src")
    page.locator("#heat-class").select_option(other)  # another class: a new explanation
    review.expect(overlay).not_to_have_attribute("src", first, timeout=EXPECT_MS)
    review.expect(overlay).to_have_attribute("alt", f"Heat map of {other} over the film")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the heat map (PNG)").click()
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    toggle.click()
    review.expect(overlay).to_be_hidden()


def test_a_document_image_gets_the_ood_warning_with_its_class_hidden_and_no_heat_map(review, document_png):
    review.signed_in().upload("scanned_form.png", document_png)
    review.answered()
    page = review.page
    warning = page.locator("#ood-warning")
    review.expect(warning).to_be_visible()
    review.expect(warning).to_have_attribute("role", "alert")
    review.expect(page.locator("#ood-text")).to_contain_text(re.compile(r"Out-of-distribution score -?\d+\.\d\d"))
    review.expect(page.locator("#label")).to_be_hidden()
    review.expect(page.locator("#bars")).to_be_hidden()
    review.expect(page.locator("#heat-toggle")).to_be_disabled()
    review.expect(page.locator("#heat-class")).to_be_hidden()  # its menu would name the predicted class
    review.expect(page.locator("#heat-refused")).to_be_visible()
    assert not any(name in page.locator("#result").inner_text() for name in CLASS_NAMES), "the class shows"
    review.screenshot("ood_warning.png")
    page.get_by_role("button", name="Show the class anyway").click()
    review.expect(page.locator("#label")).to_have_text(re.compile("|".join(CLASS_NAMES)))
    review.expect(page.locator("#shown-anyway")).to_be_visible()
    review.expect(page.locator("#heat-toggle")).to_be_disabled()  # still no heat map for it


def test_an_empty_file_shows_the_apis_reason_and_the_page_stays_usable(review, phantom_png):
    review.signed_in().upload("empty.png", b"")
    page = review.page
    error = page.locator("#error")
    review.expect(error).to_be_visible(timeout=EXPECT_MS)
    review.expect(page.locator("#error-reason")).to_have_text("The image is empty (0 bytes).")
    review.expect(page.locator("#error-code")).to_have_text("Code empty_body, HTTP 400.")
    review.expect(page.locator("#error-file-name")).to_have_text("empty.png")
    assert "{" not in error.inner_text(), "the refusal is shown in words, not as JSON"
    review.expect(page.locator("#result")).to_be_hidden()
    review.screenshot("error.png")
    review.upload("phantom.png", phantom_png)  # the page stays usable
    review.answered()
    review.expect(error).to_be_hidden()


def test_a_wrong_token_is_refused_and_the_right_one_works_kept_in_memory_only(review, server, phantom_png):
    page_response = httpx.get(f"{server}/", timeout=10)  # the page needs no token; the API routes do
    assert page_response.status_code == 200 and "content-security-policy" in page_response.headers
    assert TOKEN not in page_response.text
    assert httpx.get(f"{server}/model", timeout=10).status_code == 401

    page = review.page
    review.expect(page.locator("#token-message")).to_contain_text("requires an access token", timeout=EXPECT_MS)
    review.enter_token("not-the-token")
    review.expect(page.locator("#token-message")).to_have_text("The token was refused (HTTP 401): enter it again.")
    review.expect(page.locator("#token-panel")).to_be_visible()
    review.expect(page.locator("#token-input")).to_be_focused()
    review.enter_token(TOKEN)
    review.expect(page.locator("#token-panel")).to_be_hidden(timeout=EXPECT_MS)
    review.upload("phantom.png", phantom_png)
    review.answered()
    review.expect(page.locator("#label")).to_have_text(re.compile("|".join(CLASS_NAMES)))
    stored = page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""] and review.context.cookies() == []
    assert page.locator("#token-input").input_value() == ""  # not left in the form either


def test_a_file_name_with_html_is_shown_as_text_and_runs_no_script(review, phantom_png):
    review.signed_in().upload(XSS_NAME, phantom_png)
    review.answered()
    page = review.page
    review.expect(page.locator("#file-name")).to_have_text(XSS_NAME)
    assert page.locator("img[src='x']").count() == 0, "the name was parsed as HTML"
    assert page.locator("#file-name").evaluate("node => node.children.length") == 0
    # review.close() then asserts: no dialog (alert) opened, no script error, no CSP violation
