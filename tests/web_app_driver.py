"""Start `lavcap app` on a free local port and drive its page in headless Chromium (Debian's chromium and
chromium-driver, through selenium). Used by `tests/test_web_demo.py` and `scripts/screenshot_web_demo.py`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Without the background-networking flags, Chromium on a closed network stalls on its own update and sync calls.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_app(model: str | os.PathLike, workdir: str | os.PathLike, timeout: float = 300) -> Iterator[str]:
    """`lavcap app --model MODEL` in a subprocess on a free port; yields its URL once it answers. Its log is
    `workdir/app.log`; its uploads and cached files stay under `workdir`."""
    workdir = Path(workdir)
    (workdir / "gradio").mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(workdir / "gradio"),
        "TMPDIR": str(workdir),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "lavcap_cli", "app", "--model", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu"]
    log_path = workdir / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, timeout, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer at {url} within {timeout} s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1800) -> Iterator:
    """Headless Chromium with a fresh profile, driven by selenium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise RuntimeError(
            f"{CHROMIUM} and {CHROMEDRIVER} are needed: `bash scripts/test.sh` installs them (apt-get install "
            "chromium chromium-driver, as root)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    with tempfile.TemporaryDirectory(prefix="lavcap-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def caption_in_page(
    driver, url: str, clip: str | os.PathLike, timeout: float = 180, reload: bool = True
) -> None:
    """Open the page (or, with `reload=False`, stay on it and clear the video input), upload `clip` through the
    video input and press Caption (the answer is not awaited)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    if reload:
        driver.get(url)
    else:
        for clear in driver.find_elements(By.CSS_SELECTOR, "#clip button[aria-label='Clear']"):
            clear.click()
    wait = WebDriverWait(driver, timeout)
    upload = wait.until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#clip input[type=file]"))
    )
    upload.send_keys(str(Path(clip).resolve()))
    # The upload is done when the component swaps its file input for the player.
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#clip input[type=file]"))
    driver.find_element(By.ID, "caption-button").click()


def wait_for_caption(driver, timeout: float = 180) -> str:
    """The caption text once the page shows one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def caption(d) -> str | bool:
        boxes = d.find_elements(By.CSS_SELECTOR, "#caption textarea")
        return bool(boxes) and boxes[0].get_attribute("value")

    return WebDriverWait(driver, timeout).until(caption)


def wait_for_status(driver, containing: str, timeout: float = 180) -> str:
    """The status line's text once it holds `containing`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def status(d) -> str | bool:
        text = d.find_element(By.ID, "status").text
        return text if containing in text else False

    return WebDriverWait(driver, timeout).until(status)


def wait_until_no_toast(driver, timeout: float = 60) -> None:
    """Wait until no toast is open: Gradio closes them by themselves after about 10 s. The browser's own video
    preview raises one ("Video not playable") for an upload that is not media."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".toast-body"))


def image_size(driver, selector: str, timeout: float = 60) -> tuple[int, int]:
    """(naturalWidth, naturalHeight) of the first loaded <img> under `selector`."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = (
        "const img = document.querySelector(arguments[0] + ' img');"
        "return img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;"
    )
    return tuple(WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script, selector)))


def page_screenshot(driver, path: str | os.PathLike) -> None:
    """A screenshot of the whole page: the window is first made as tall as the page."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    driver.set_window_size(max(width, 1400), height + 40)
    time.sleep(1)  # let the page lay itself out again
    driver.save_screenshot(str(path))
