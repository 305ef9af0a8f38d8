"""The playground page at `/`, driven in headless Chromium against real Ray Serve.

Needs the Debian packages `chromium` and `chromium-driver` and the `selenium` Python package.
Without them the test is skipped, or fails when the CI environment variable is set.
"""

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import API_KEYS, API_KEYS_ENV, deployed_app, fake_args, post

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
WAIT_S = 60
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1200,1400",
]


def _unavailable(reason: str) -> None:
    message = (f"{reason}; install it with `apt-get install -y chromium chromium-driver` "
               "and `pip install selenium`")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("the selenium package is not installed")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _unavailable(f"{path} is not installed")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # An explicit driver path: selenium-manager never downloads anything.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
        condition, message=f"timed out after {WAIT_S}s waiting for {what}")


def _natural_size(driver, element) -> tuple[int, int]:
    size = driver.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", element)
    return size[0], size[1]


def _loaded(element_js: str):
    script = (f"const img = {element_js}; "
              "return !!img && img.complete && img.naturalWidth > 0;")
    return lambda driver: driver.execute_script(script)


def test_page_is_served_at_the_root_of_the_route_prefix(fake_app):
    # Without the trailing slash, Starlette redirects to it (so relative URLs resolve).
    bare = httpx.get(fake_app)
    assert bare.status_code == 307
    assert bare.headers["location"] == f"{fake_app}/"
    for url in (fake_app, f"{fake_app}/"):
        response = httpx.get(url, follow_redirects=True)
        assert str(response.url) == f"{fake_app}/"
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert "<title>SDXL-Turbo playground</title>" in response.text
        # Relative API path: the page must work under any route_prefix.
        assert '"api/text2image"' in response.text
        assert '"/api/text2image"' not in response.text
    # The page is not part of the API schema.
    assert "/" not in httpx.get(f"{fake_app}/openapi.json").json()["paths"]


def test_playground_generates_and_shows_errors(browser, fake_app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    # 1. Load the page (under the /fake route prefix, no trailing slash).
    browser.get(fake_app)
    assert browser.title == "SDXL-Turbo playground"
    # What the replicas run, read from /readyz (the fake reports the configured profile).
    _wait(browser, lambda d: d.find_element(By.ID, "running").is_displayed(), "the profile")
    assert browser.find_element(By.ID, "running").text == (
        "Running: profile quality (UNet fake, VAE fake) on fake, uint8.")

    # 2. Submit a prompt: 512x512, 2 steps, 2 images (so there is a grid).
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
    Select(browser.find_element(By.ID, "size")).select_by_value("512x512")
    for field, value in (("steps", "2"), ("number", "2")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "submit").click()

    # 3. Wait for the images and the grid to load.
    _wait(browser, _loaded("document.querySelectorAll('img.result-image')[1]"), "the images")
    _wait(browser, _loaded("document.getElementById('grid')"), "the grid")

    # 4. The images are 512x512; the grid of 2 is one row of two.
    images = browser.find_elements(By.CSS_SELECTOR, "img.result-image")
    assert len(images) == 2
    assert [_natural_size(browser, img) for img in images] == [(512, 512), (512, 512)]
    assert _natural_size(browser, browser.find_element(By.ID, "grid")) == (1024, 512)
    assert browser.find_element(By.ID, "grid-section").is_displayed()
    urls = [img.get_attribute("src") for img in images]
    assert urls[0].startswith(f"{fake_app}/images/") and urls[0].endswith("/0_0.png")
    assert urls[1].endswith("/1_0.png")
    captions = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "figcaption .latency")]
    assert [c.split(" · ")[0] for c in captions] == ["0_0.png", "1_0.png"]
    assert all(c.split(" · ")[1].endswith(" s") for c in captions)
    summary = browser.find_element(By.ID, "summary").text
    assert summary.startswith("2 image(s) in ")
    assert " · 512x512 · 2 step(s) · seed " in summary
    assert not browser.find_element(By.ID, "error").is_displayed()

    if os.environ.get("SDXL_SCREENSHOT_DIR"):
        target = Path(os.environ["SDXL_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(target / "playground.png"))

    # 5. An empty prompt: the API's 422 is shown as a readable message naming the field.
    expected = post(fake_app, {"prompt": "", "size": "512x512", "step": 2, "number": 2})
    assert expected.status_code == 422
    api_error = expected.json()["error"]
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "submit").click()
    error = browser.find_element(By.ID, "error")
    _wait(browser, lambda _: error.is_displayed(), "the error message")
    assert error.find_element(By.TAG_NAME, "strong").text == f"prompt: {api_error['message']}"
    assert error.find_element(By.TAG_NAME, "span").text == "HTTP 422 · invalid_request"
    assert browser.find_elements(By.CSS_SELECTOR, "img.result-image") == []
    assert not browser.find_element(By.ID, "grid-section").is_displayed()
    assert browser.find_element(By.ID, "status").text == "Failed."

    if os.environ.get("SDXL_SCREENSHOT_DIR"):
        target = Path(os.environ["SDXL_SCREENSHOT_DIR"]) / "playground-error.png"
        browser.save_screenshot(str(target))


@pytest.fixture(scope="module")
def protected_app(serve_url, tmp_path_factory):
    with deployed_app(serve_url, "protected-page", fake_args(
            tmp_path_factory.mktemp("protected-page"),
            security={"api_keys_env": API_KEYS_ENV, "protect_images": True})) as url:
        yield url


def test_playground_shows_protected_images_with_the_api_key(browser, protected_app):
    from selenium.webdriver.common.by import By

    browser.get(protected_app)
    browser.find_element(By.CSS_SELECTOR, "details summary").click()  # the API key field
    browser.find_element(By.ID, "apikey").send_keys(API_KEYS[0])
    browser.find_element(By.ID, "prompt").send_keys("a locked door")
    number = browser.find_element(By.ID, "number")
    number.clear()
    number.send_keys("2")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, _loaded("document.querySelectorAll('img.result-image')[1]"), "the images")
    _wait(browser, _loaded("document.getElementById('grid')"), "the grid")

    images = browser.find_elements(By.CSS_SELECTOR, "img.result-image")
    assert [_natural_size(browser, img) for img in images] == [(512, 512), (512, 512)]
    assert _natural_size(browser, browser.find_element(By.ID, "grid")) == (1024, 512)
    # Fetched with the key and shown from memory: a plain <img src> would get a 401.
    assert all(img.get_attribute("src").startswith("blob:") for img in images)
    url = images[0].get_attribute("data-url")
    assert url.startswith(f"{protected_app}/images/") and url.endswith("/0_0.png")
    assert httpx.get(url).status_code == 401
    assert not browser.find_element(By.ID, "error").is_displayed()


@pytest.fixture(scope="module")
def slow_app(serve_url, tmp_path_factory):
    """Denoising steps that take 0.6 s each: long enough to watch them in the page."""
    with deployed_app(serve_url, "slow-page", fake_args(
            tmp_path_factory.mktemp("slow-page"),
            model={"generator_options": {"delay_s": 2.4}})) as url:
        yield url


def _png_file(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path / "input.png"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_playground_shows_progress_and_a_preview_before_the_images(browser, slow_app,
                                                                   tmp_path):
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By

    browser.get(slow_app)
    browser.find_element(By.ID, "prompt").send_keys("a slow sunrise")
    browser.find_element(By.ID, "submit").click()

    # 1. While generating: the preview is shown, with the progress bar and its text, and
    #    no final image yet.
    preview = browser.find_element(By.ID, "preview")
    _wait(browser, _loaded("document.getElementById('preview')"), "the first preview")
    assert browser.find_elements(By.CSS_SELECTOR, "img.result-image") == []
    assert _natural_size(browser, preview) == (64, 64)
    text = browser.find_element(By.ID, "progress-text").text
    assert text.startswith("step ") and " / 4 · " in text and text.endswith(" s")
    bar = browser.find_element(By.ID, "progress")
    assert bar.get_attribute("max") == "4"
    assert 1 <= int(bar.get_attribute("value")) <= 4
    # The screenshot shows it: the fake replica's previews are flat greys (32 x step).
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    ratio = browser.execute_script("return window.devicePixelRatio")
    rect = preview.rect
    centre = (int((rect["x"] + rect["width"] / 2) * ratio),
              int((rect["y"] + rect["height"] / 2) * ratio))
    level = shot.getpixel(centre)
    assert level[0] == level[1] == level[2] and level[0] in (32, 64, 96, 128), level
    assert not browser.find_elements(By.CSS_SELECTOR, "img.result-image")
    if os.environ.get("SDXL_SCREENSHOT_DIR"):
        target = Path(os.environ["SDXL_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shot.save(target / "playground-progress.png")

    # 2. Then the image; the bar is full and the result is in this session's history.
    _wait(browser, _loaded("document.querySelectorAll('img.result-image')[0]"), "the image")
    assert browser.find_element(By.ID, "progress-text").text.startswith("step 4 / 4 · ")
    assert bar.get_attribute("value") == "4"
    history = browser.find_elements(By.CSS_SELECTOR, "#history li")
    assert [item.text for item in history] == ["a slow sunrise"]

    # 3. Image to image: choose a file, set the strength; the history grows.
    browser.find_element(By.ID, "mode-image").click()
    browser.find_element(By.ID, "image-file").send_keys(str(_png_file(tmp_path)))
    _wait(browser, _loaded("document.getElementById('input-thumb')"), "the input thumbnail")
    browser.execute_script(
        "const s = document.getElementById('strength'); s.value = '0.75';"
        "s.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "strength-value").text == "0.75"
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("the same, in ink")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 2,
          "the second result in the history")
    _wait(browser, _loaded("document.querySelectorAll('img.result-image')[0]"), "the image")
    items = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#history li")]
    assert items == ["img2img · the same, in ink", "a slow sunrise"]
    # 4 steps at strength 0.75: 3 denoising steps
    assert browser.find_element(By.ID, "progress-text").text.startswith("step 3 / 3 · ")
    assert not browser.find_element(By.ID, "error").is_displayed()


@pytest.fixture(scope="module")
def two_model_app(serve_url, tmp_path_factory):
    args = fake_args(tmp_path_factory.mktemp("models-page"))
    args["models"] = [{"id": "tiny-b", "source": "fake"}]
    with deployed_app(serve_url, "models-page", args) as url:
        yield url


def test_playground_picks_the_model_and_says_which_made_each_image(browser, two_model_app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(two_model_app)
    # The picker lists GET v1/models, the default chosen.
    _wait(browser, lambda d: d.find_element(By.ID, "model-field").is_displayed(), "the picker")
    picker = Select(browser.find_element(By.ID, "model"))
    assert [o.text for o in picker.options] == ["sdxl-turbo (default)", "tiny-b"]
    assert picker.first_selected_option.get_attribute("value") == "sdxl-turbo"
    # Each model's whole name fits in the picker (it was cut to "sdxl-turbo (defa").
    text_px, room_px = browser.execute_script("""
        const s = document.getElementById("model"), style = getComputedStyle(s);
        const ctx = document.createElement("canvas").getContext("2d");
        ctx.font = style.font;
        const text = Math.max(...[...s.options].map((o) => ctx.measureText(o.text).width));
        // content box, less about 20 px for the drop-down arrow
        const room = s.clientWidth - parseFloat(style.paddingLeft)
                     - parseFloat(style.paddingRight) - 20;
        return [text, room];""")
    assert text_px <= room_px, (text_px, room_px)
    browser.find_element(By.ID, "prompt").send_keys("a harbour")
    for model, done in (("tiny-b", 1), ("sdxl-turbo", 2)):
        picker.select_by_value(model)
        browser.find_element(By.ID, "submit").click()
        _wait(browser, lambda d, n=done: len(d.find_elements(By.CSS_SELECTOR, "#history li"))
              == n, f"the result of {model}")
        _wait(browser, _loaded("document.querySelectorAll('img.result-image')[0]"), "the image")
        assert f" · model {model} · id " in browser.find_element(By.ID, "summary").text
        caption = browser.find_element(By.CSS_SELECTOR, "figcaption .latency").text
        assert caption.split(" · ")[2] == model
    assert [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#history li")] == [
        "sdxl-turbo · a harbour", "tiny-b · a harbour"]
