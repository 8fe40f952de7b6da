"""The live page in a real browser: Debian's headless Chromium driven by selenium, against a real
`mosaic serve` of the default model.

Skipped only where Chromium or its driver is not installed (`.ci/run` installs both). Set
MOSAIC_SCREENSHOT_DIR to keep the screenshots (the README's comes from here).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from mosaic_dllm.engine import default_model_path
from tests.processes import mosaic_serve

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed"
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1500",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, script: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {script}")


def set_fields(driver, **values) -> None:
    for name, value in values.items():
        field = driver.find_element("id", name)
        field.clear()
        field.send_keys(str(value))


def screenshot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    keep = os.environ.get("MOSAIC_SCREENSHOT_DIR")
    if keep:
        shutil.copy(tmp_path / name, Path(keep) / name)


@pytest.mark.slow
def test_the_page_denoises_stops_and_explains_refusals(browser, tmp_path):
    flags = ("--allow-long-context", "--memory-budget", "64MiB")
    with mosaic_serve(default_model_path(), *flags) as (url, _):
        browser.get(url + "/")
        assert "mosaic-dllm" in browser.title
        wait(browser, "document.getElementById('chat').disabled", 5)  # the default model has no chat template
        assert "no chat template" in browser.find_element("id", "chat-label").text

        # 1. A generation: the canvas redraws every step, fewer cells masked each time, and the
        #    final text is the API's answer for the same settings and seed.
        settings = {"max_tokens": 32, "steps": 32, "block_length": 8, "seed": 3}
        set_fields(browser, prompt="Return the number of", **settings)
        browser.find_element("id", "generate").click()
        wait(browser, "window.mosaic.done")
        seen = browser.execute_script("return window.mosaic")
        masked = seen["masked"]
        assert len(masked) == seen["steps"] == settings["steps"]  # one redraw per step
        assert all(a > b for a, b in zip(masked, masked[1:], strict=False)), masked
        said = [int(re.search(r"(\d+) of \d+ positions masked", text)[1]) for text in seen["statuses"]]
        assert said == masked  # the status counts the grey cells, after an EOS too
        inputs = browser.find_elements("css selector", "#settings input, #settings select")
        fields = {e.get_attribute("id") for e in inputs}
        assert {"threshold", "cache", "remasking"} <= fields and not {"alg", "top_k"} & fields  # a LLaDA model's
        api = httpx.post(f"{url}/v1/completions", json={"prompt": "Return the number of", **settings}, timeout=60)
        assert seen["text"] == api.json()["choices"][0]["text"]
        assert browser.find_element("id", "text").text.strip() == seen["text"].strip()  # shown as answered
        plan = browser.find_element("id", "plan").text
        assert "predicted peak" in plan and "MiB" in plan and "chunks" in plan
        assert seen["admission"]["budget_bytes"] == 64 << 20
        wait(browser, "document.getElementById('server').textContent.includes('running')", 5)
        screenshot(browser, tmp_path, "page.png")

        # 2. Stop cancels a long request on the server.
        set_fields(browser, max_tokens=1500, steps=1500, block_length=1500)
        browser.find_element("id", "generate").click()
        wait(browser, "window.mosaic.steps >= 2")
        browser.find_element("id", "stop").click()
        wait(browser, "window.mosaic.stopped", 10)
        deadline = time.time() + 20
        while httpx.get(f"{url}/health").json()["running"]:
            assert time.time() < deadline, "the server kept running the stopped request"
            time.sleep(0.1)

        # 3. A request the budget can never hold: the longest length that fits, in words.
        set_fields(browser, max_tokens=1_000_000, steps=1, block_length=1_000_000)
        browser.find_element("id", "generate").click()
        message = wait(browser, "window.mosaic.error", 30)
        assert "longest request" in message and "tokens" in message
        assert browser.find_element("id", "error").is_displayed()

        # 4. Readable on a phone: nothing wider than 375 px.
        browser.set_window_size(375, 900)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 375
        screenshot(browser, tmp_path, "page-375.png")
        browser.set_window_size(1200, 1500)
