"""`genvl ui` served for real and driven by headless Chromium (Selenium with the system browser and
its driver): type a prompt, generate, wait for the images, screenshot; upload an image for variations.

Screenshots go to the test's tmp folder and, when GENVL_UI_SHOTS names a folder, there too.
The browser tests skip (saying why) only when no chromium / chromedriver is installed; .ci/run
installs Debian's `chromium` and `chromium-driver` and sets GENVL_REQUIRE_BROWSER=1, so in CI they run
(or fail).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ui_models import DEMO_DIR, build_tiny_model, png

pytest.importorskip("streamlit", reason="the UI tests need streamlit: pip install -e '.[dev]'")

START_TIMEOUT = 120  # s: torch import and streamlit start on a busy 2-core machine
RUN_TIMEOUT = 240  # s: one generation, with the model load, through the browser


def _browser_paths() -> tuple[str | None, str | None]:
    browser = os.environ.get("GENVL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("GENVL_CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Server:
    """``genvl ui`` in its own process group (it starts the streamlit server as a child)."""

    def __init__(self, model: Path | None, log: Path):
        self.port = _free_port()
        self.url = f"http://localhost:{self.port}"
        self.log = log
        args = [sys.executable, "-m", "genvl", "ui", "--port", str(self.port)]
        if model is not None:
            args += ["--model", str(model)]
        self.proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"genvl ui exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"genvl ui did not answer on {self.url} within {START_TIMEOUT} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)  # streamlit may take longer to close its sessions; not worth waiting
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("ui-browser") / "tiny")


@pytest.fixture(scope="module", params=["tiny", "demo"])
def server(request, tiny_model, tmp_path_factory):
    if request.param == "demo" and not (DEMO_DIR / "genvl.json").is_file():
        pytest.skip("this checkout has no built-in demo model")
    model = tiny_model if request.param == "tiny" else None  # no --model: the built-in demo
    srv = Server(model, tmp_path_factory.mktemp("ui-log") / "genvl-ui.log")
    srv.name = request.param
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_genvl_ui_prints_its_address_and_serves_the_app(server):
    first = server.output().splitlines()[0]
    model = "tiny" if server.name == "tiny" else "genvl/assets/demo"
    assert first.startswith("genvl ui: serving ") and model in first and f"at {server.url} " in first
    with urllib.request.urlopen(server.url, timeout=10) as r:
        assert r.status == 200 and b"<html" in r.read().lower()


# ------------------------------------------------------------------------------------------ browser
@pytest.fixture(scope="module")
def browser():
    path, driver_path = _browser_paths()
    if not path or not driver_path:
        if os.environ.get("GENVL_REQUIRE_BROWSER"):
            pytest.fail("GENVL_REQUIRE_BROWSER is set but no chromium / chromedriver is installed")
        pytest.skip("no chromium / chromedriver installed (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: "
                                    "pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1250", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)  # the given driver: nothing downloads
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def _by():
    from selenium.webdriver.common.by import By

    return By


def _wait(drv, until, timeout: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.25).until(until)
    except TimeoutException:
        if os.environ.get("GENVL_UI_SHOTS"):
            drv.save_screenshot(str(Path(os.environ["GENVL_UI_SHOTS"]) / "timed-out.png"))
        alerts = [e.text for e in drv.find_elements(_by().CSS_SELECTOR, '[data-testid="stAlert"], '
                                                                           '[data-testid="stException"]')]
        pytest.fail(f"timed out after {timeout} s waiting for {what}; messages on the page: {alerts}")


def _number_input(drv, label: str):
    """The visible tab's number input labelled LABEL, waiting for it: the tab renders its inputs only once
    the model has loaded, which the first visit to the built-in demo can take a while to do."""
    xpath = f'//*[@role="tabpanel"]//div[@data-testid="stNumberInput"][.//p[normalize-space()="{label}"]]//input'
    return _wait(drv, lambda d: d.find_elements(_by().XPATH, xpath), RUN_TIMEOUT, f"the {label} input")[0]


def _idle(drv) -> None:
    """Wait until the script run that the last input started has finished (the app reruns on every input)."""
    time.sleep(0.3)
    _wait(drv, lambda d: d.find_element(_by().CSS_SELECTOR, '[data-testid="stApp"]').get_attribute(
        "data-test-script-state") == "notRunning", RUN_TIMEOUT, "the app to finish its run")


def _set(drv, element, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(value, Keys.ENTER)
    _idle(drv)


def _click(drv, text: str) -> None:
    xpath = f'//*[@role="tabpanel"]//button[.//p[normalize-space()="{text}"]]'
    _wait(drv, lambda d: d.find_elements(_by().XPATH, xpath), 60, f"the {text} button")[0].click()


def _finished_images(drv, n: int, min_count: int):
    """The loaded gallery images once the progress bar says Finished, else False (for WebDriverWait)."""
    bars = drv.find_elements(_by().CSS_SELECTOR, '[role="tabpanel"] [data-testid="stProgress"]')
    if not bars or not bars[0].text.startswith("Finished"):
        return False
    imgs = drv.find_elements(_by().CSS_SELECTOR, '[role="tabpanel"] [data-testid="stImage"] img')
    loaded = [im for im in imgs if drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)]
    buttons = drv.find_elements(_by().CSS_SELECTOR, '[role="tabpanel"] [data-testid="stDownloadButton"] button')
    return loaded if len(loaded) >= min_count and len(buttons) >= n and all(b.is_displayed() for b in buttons) \
        else False


def _not_blank(png_bytes: bytes) -> float:
    px = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"), dtype=np.float32)
    return float(px.std())


def _save_shot(drv, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    drv.save_screenshot(str(shot))
    if os.environ.get("GENVL_UI_SHOTS"):
        out = Path(os.environ["GENVL_UI_SHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / name)
    return shot


def test_generate_in_the_browser(server, browser, tmp_path):
    By = _by()
    browser.get(server.url)
    prompt = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, 'input[aria-label="Prompt"]'), RUN_TIMEOUT,
                   "the Generate tab")
    _idle(browser)
    n = 4
    if server.name == "demo":  # fewer steps than the demo's recommended 50, to keep the test short
        _set(browser, _number_input(browser, "Steps"), "10")
        _set(browser, _number_input(browser, "Prior steps"), "8")
    from selenium.webdriver.common.keys import Keys

    prompt.send_keys("a red heart", Keys.ENTER)
    _idle(browser)
    _click(browser, "Generate")
    images = _wait(browser, lambda d: _finished_images(d, n, n), RUN_TIMEOUT, "the generated images")
    assert len(images) == n
    time.sleep(0.5)  # let the last frame paint
    shot = _save_shot(browser, tmp_path, f"generate-{server.name}.png")
    assert shot.stat().st_size > 0
    # the image elements show pixels, not a blank square
    for im in images:
        assert _not_blank(im.screenshot_as_png) > 5.0
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, '[role="tabpanel"] [data-testid="stImage"]')]
    assert sum("a red heart" in c and "seed 0" in c for c in captions) == n
    assert prompt.get_attribute("value") == "a red heart"
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    progress = browser.find_element(By.CSS_SELECTOR, '[role="tabpanel"] [data-testid="stProgress"]')
    assert progress.text.startswith(f"Finished: {n} images")


def test_upload_for_variations_in_the_browser(server, browser, tmp_path):
    By = _by()
    if not browser.current_url.startswith(server.url):
        browser.get(server.url)
    tab = _wait(browser, lambda d: d.find_element(By.XPATH, '//*[@role="tab"][.//p[normalize-space()="Variations"]]'),
                RUN_TIMEOUT, "the tabs")
    tab.click()
    _idle(browser)
    upload = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, '[role="tabpanel"] input[type="file"]'), 30,
                   "the Variations tab's file input")
    image = tmp_path / "circle.png"
    image.write_bytes(png())
    upload.send_keys(str(image))  # a real upload through the browser
    _wait(browser, lambda d: any("circle.png" in e.text for e in d.find_elements(
        By.CSS_SELECTOR, '[role="tabpanel"] [data-testid="stImage"]')), 60, "the uploaded image's preview")
    _idle(browser)
    _set(browser, _number_input(browser, "Images"), "2")
    _set(browser, _number_input(browser, "Steps"), "4")
    _click(browser, "Make variations")
    images = _wait(browser, lambda d: _finished_images(d, 2, 3), RUN_TIMEOUT, "the variations")
    _save_shot(browser, tmp_path, f"variations-{server.name}.png")
    for im in images:
        assert _not_blank(im.screenshot_as_png) > 1.0
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, '[role="tabpanel"] [data-testid="stImage"]')]
    assert sum("variations of circle.png" in c for c in captions) == 2
