"""The playground page at `/`, driven end to end in Debian's Chromium against a real Loupe server."""
from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright
from skimage import data as skdata

from server.config import PROJECT_ROOT
from tests.conftest import loupe_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOT = PROJECT_ROOT / "test-output" / "playground.png"
MODEL = "realesr-animevideov3"
RUN_TIMEOUT_MS = 180_000
# For what needs a fetch or a script to run (the model list, a stored result reopened): a hang, not a slow machine.
EXPECT_TIMEOUT_MS = 60_000
API_KEY = "sk-playground-test-key"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="install Debian's chromium (apt-get install chromium) to run the browser test"
)


@pytest.fixture(scope="module", autouse=True)
def patient_expect() -> Iterator[None]:
    """Every `expect` of this module waits up to EXPECT_TIMEOUT_MS, not Playwright's default 5 s."""
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    yield
    expect.set_options(timeout=None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@contextmanager
def open_page(browser: Browser, base_url: str) -> Iterator[Page]:
    """A fresh page (own storage) at the playground; any script error on it fails the test."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(EXPECT_TIMEOUT_MS)  # page loads and waits for a selector, as for `expect`
    page = context.new_page()
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto("/")
    try:
        yield page
    finally:
        context.close()
    assert script_errors == []


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photo, 96x64, as a PNG."""
    path = tmp_path_factory.mktemp("photos") / "coffee.png"
    Image.fromarray(skdata.coffee()).resize((96, 64), Image.Resampling.LANCZOS).save(path)
    return path


def choose_image_and_model(page: Page, image: Path | dict[str, object], scale: str) -> None:
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    page.set_input_files("#file", image)
    page.select_option("#model", MODEL)
    page.fill("#scale", scale)
    page.select_option("#format", "png")


def clip_left_percent(page: Page) -> float:
    clip = page.eval_on_selector("#after-layer", "layer => getComputedStyle(layer).clipPath")
    match = re.fullmatch(r"inset\(0px 0px 0px ([\d.]+)%\)", clip)
    assert match, clip
    return float(match.group(1))


def test_model_picker_shows_where_each_model_runs(browser: Browser, loupe_url: str) -> None:
    with open_page(browser, loupe_url) as page:
        local = page.locator(f"optgroup[label='Run on this server (free)'] option[value='{MODEL}']")
        expect(local).to_have_count(1)
        # No fal key and no gateway in the test settings: remote-only models can't run, and say why.
        expect(page.locator("optgroup[label=\"Can't run now\"] option[value='topaz-image-upscale']")).to_have_count(1)
        page.select_option("#model", "topaz-image-upscale")
        expect(page.locator("#model-info")).to_contain_text("Can't run now")
        expect(page.locator("#model-info")).to_contain_text("no remote provider")
        page.select_option("#model", MODEL)
        expect(page.locator("#model-info")).to_contain_text("Runs here")
        expect(page.locator("#model-info")).to_contain_text("×2, ×3, ×4")


def test_upscale_compare_zoom_and_download(browser: Browser, loupe_url: str, photo: Path) -> None:
    with open_page(browser, loupe_url) as page:
        choose_image_and_model(page, photo, "3")
        expect(page.locator("#source-dims")).to_have_text("96 × 64 px")
        expect(page.locator("#scale-hint")).to_have_text("Output 288 × 192 px")

        with page.expect_request(lambda r: "/v1/progress/" in r.url) as progress_request, \
                page.expect_request(lambda r: r.url.endswith("/v1/images/edits")) as edit_request:
            page.click("#run")
        expect(page.locator("#result")).to_be_visible(timeout=RUN_TIMEOUT_MS)

        # The page names the request itself and watches that id's progress stream.
        request_id = edit_request.value.all_headers()["x-request-id"]
        assert re.fullmatch(r"[A-Za-z0-9._-]{8,64}", request_id)
        assert progress_request.value.url.endswith(f"/v1/progress/{request_id}")

        expect(page.locator("#stat-size")).to_contain_text("288 × 192 px")
        expect(page.locator("#stat-provider")).to_contain_text("Loupe")
        expect(page.locator("#stat-provider")).to_contain_text("local/realesr-animevideov3-x3")
        expect(page.locator("#stat-cost")).to_contain_text("Free")
        expect(page.locator("#stat-time")).to_have_text(re.compile(r"^\d+\.\d s"))

        # Before is the 96x64 input stretched over exactly the output's box.
        assert page.eval_on_selector("#before", "img => img.naturalWidth") == 96
        assert page.locator("#before").bounding_box() == page.locator("#after").bounding_box()

        compare = page.locator("#compare")
        compare.scroll_into_view_if_needed()
        box = compare.bounding_box()
        assert box is not None
        mid_y = box["y"] + box["height"] / 2
        assert clip_left_percent(page) == pytest.approx(50)
        page.mouse.move(box["x"] + box["width"] * 0.5, mid_y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.2, mid_y, steps=6)
        page.mouse.up()
        assert clip_left_percent(page) == pytest.approx(20, abs=0.5)

        # The loupe follows the pointer and magnifies output pixels 2:1, then 1:1.
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.45)
        expect(page.locator("#lens")).to_be_visible()
        assert page.eval_on_selector("#lens-after", "half => half.style.backgroundSize") == "576px 384px"
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        page.click("label:has-text('1:1')")
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5)
        assert page.eval_on_selector("#lens-after", "half => half.style.backgroundSize") == "288px 192px"
        page.focus("#slider")  # the divider moves from the keyboard too
        page.keyboard.press("ArrowRight")
        assert clip_left_percent(page) > 20.2

        download = page.locator("#download")
        assert (download.get_attribute("download") or "").endswith(".png")
        href = download.get_attribute("href")
        assert href is not None
        response = httpx.get(href)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        result = Image.open(io.BytesIO(response.content))
        assert (result.format, result.size) == ("PNG", (288, 192))


def test_api_error_is_shown_as_a_readable_message(browser: Browser, loupe_url: str) -> None:
    not_an_image = b"these are my notes, not a picture\n"
    expected = httpx.post(
        f"{loupe_url}/v1/images/edits",
        data={"model": MODEL, "scale_factor": "2"},
        files={"image": ("notes.txt", not_an_image, "text/plain")},
    ).json()["error"]
    with open_page(browser, loupe_url) as page:
        choose_image_and_model(page, {"name": "notes.txt", "mimeType": "text/plain", "buffer": not_an_image}, "2")
        page.click("#run")
        message = page.locator("#message")
        expect(message).to_be_visible(timeout=RUN_TIMEOUT_MS)
        expect(message).to_contain_text("Request failed (400)")
        expect(message).to_contain_text(expected["message"])
        expect(message).to_contain_text(f"Field {expected['param']}")
        assert "{" not in message.inner_text()
        expect(page.locator("#drop")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#result")).to_be_hidden()
        expect(page.locator("#run")).to_be_enabled()


@pytest.fixture(scope="module")
def keyed_loupe_url(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from server.app import create_app
    from tests.servers import serve

    settings = loupe_settings(weights_dir, tmp_path_factory.mktemp("keyed-data"), api_keys=[API_KEY])
    with serve(create_app(settings)) as url:
        yield url


def test_api_key_is_remembered_and_sent_with_every_call(browser: Browser, keyed_loupe_url: str, photo: Path) -> None:
    context = browser.new_context(base_url=keyed_loupe_url)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto("/")
        expect(page.locator("#model-info")).to_contain_text("needs an API key")
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        expect(page.locator(f"#model option[value='{MODEL}']")).to_have_count(1)

        page.reload()
        expect(page.locator("#api-key")).to_have_value(API_KEY)
        choose_image_and_model(page, photo, "2")
        with page.expect_response(lambda r: "/v1/progress/" in r.url) as progress, \
                page.expect_response(lambda r: r.url.endswith("/v1/images/edits")) as edit:
            page.click("#run")
        expect(page.locator("#result")).to_be_visible(timeout=RUN_TIMEOUT_MS)
        for response in (progress.value, edit.value):
            assert response.status == 200
            assert response.request.all_headers()["authorization"] == f"Bearer {API_KEY}"
        # The progress stream got through with the key: the run reports the tiles it went through.
        expect(page.locator("#stat-time small")).to_have_text(re.compile(r"^\d+ tiles?$"))
    finally:
        context.close()


def test_recent_requests_list_their_status_and_reopen_a_result(browser: Browser, loupe_url: str,
                                                               photo: Path) -> None:
    accepted = httpx.post(f"{loupe_url}/v1/images/edits", data={"model": MODEL, "scale_factor": "2"},
                          files={"image": ("coffee.png", photo.read_bytes())}, headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    request_id = accepted.json()["id"]
    with open_page(browser, loupe_url) as page:
        entry = page.locator(f"#recent li[data-id='{request_id}']")
        expect(entry).to_be_visible()
        expect(entry.locator(".status")).to_have_text("completed", timeout=RUN_TIMEOUT_MS)  # refreshed while open
        expect(entry).to_contain_text("192x128")
        entry.locator("button").click()
        expect(page.locator("#result")).to_be_visible()
        expect(page.locator("#stat-size")).to_contain_text("192 × 128 px")
        expect(page.locator("#stat-time small")).to_contain_text("reopened from its record")
