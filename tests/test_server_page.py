"""The web chat page (lmforge/server/static/chat.html) in a real headless Chromium, driven by Selenium.

A tiny random model is served with keys on; the page must ask for the key, list only chat models,
stream an answer equal to the API's greedy answer, render something that is not a blank screenshot,
and stop a long answer so that the engine frees its row. Needs Debian's chromium and chromedriver
(`apt-get install chromium chromium-driver`): skipped without them, except under CI=true, where
their absence is a failure. Selenium Manager never runs (both paths are given), so nothing is downloaded.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from matplotlib import image as mpimg

from lmforge.server.app import create_app
from lmforge.server.keys import create_key
from tests.server_util import CHATML, running

WAIT = 30  # seconds WebDriverWait waits for the page


def _browser() -> tuple[str, str]:
    """The paths of chromium and chromedriver; a skip (a failure under CI=true) without them."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        message = (f"the chat page test needs {' and '.join(missing)}: "
                   f"apt-get install chromium chromium-driver")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    options.binary_location = chromium
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer, make_model):
    """(base URL, app, a key with scope chat): a templated tiny model, a long-context one without a
    template (for stopping a long answer) and a stand-in classifier (which the page must not list)."""
    templated = copy.copy(tokenizer)
    templated.chat_template = CHATML
    tiny = make_model("gpt2", block_size=128)
    tiny.tokenizer = templated
    long = make_model("llama", seed=1, block_size=4096)
    long.tokenizer = tokenizer
    classifier = SimpleNamespace(labels=["neg", "pos"], probabilities=lambda *a: None, tokenizer=tokenizer,
                                 config=SimpleNamespace(block_size=64))
    keys = tmp_path_factory.mktemp("page") / "keys.json"
    token = create_key(keys, "browser", ["chat"])
    app = create_app({"tiny": tiny, "long": long, "clf": classifier}, keys=keys)
    with running(app) as url:
        yield url, app, token


def wait(driver, condition, timeout: float = WAIT, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(), message)


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def texts(driver, selector: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)


def open_page(driver, url: str, token: str) -> None:
    """Load the page, type the key (Enter loads the models) and wait for the model picker."""
    from selenium.webdriver.common.keys import Keys

    driver.get(url + "/")
    by_id(driver, "key").send_keys(token + Keys.ENTER)
    wait(driver, lambda: "tiny" in option_values(driver), message="the models did not load")


def option_values(driver) -> list[str]:
    return driver.execute_script("return [...document.getElementById('model').options].map(o => o.value)")


def settings(driver, model: str, max_tokens: int) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "model")).select_by_value(model)
    driver.execute_script("const t = document.getElementById('temperature');"
                          "t.value = '0'; t.dispatchEvent(new Event('input'));")
    assert by_id(driver, "temperature-value").text == "0"
    box = by_id(driver, "max-tokens")
    box.clear()
    box.send_keys(str(max_tokens))


def say(driver, text: str) -> None:
    by_id(driver, "message").send_keys(text)
    by_id(driver, "send").click()


def test_without_a_key_the_page_asks_for_one(driver, server):
    url, _, _ = server
    driver.get(url + "/")
    wait(driver, lambda: "401" in by_id(driver, "error").text, message="no 401 message shown")
    assert "API key" in by_id(driver, "error").text
    assert "needed" in by_id(driver, "key").get_attribute("class")
    assert "tiny" not in option_values(driver)
    say(driver, "hello")  # no model to send to: a message in the page, no request, no crash
    wait(driver, lambda: "key" in by_id(driver, "error").text.lower())
    assert texts(driver, ".msg") == []
    assert by_id(driver, "send").is_enabled()


def test_the_page_streams_the_greedy_answer_of_the_api(driver, server, tmp_path):
    url, _, token = server
    open_page(driver, url, token)
    assert sorted(option_values(driver)) == ["long", "tiny"]  # the classifier is not a chat model
    settings(driver, "tiny", max_tokens=12)
    say(driver, "Shall I compare thee")
    wait(driver, lambda: texts(driver, ".msg.assistant") and texts(driver, ".msg.assistant")[-1]
         and texts(driver, ".usage") and by_id(driver, "send").is_enabled(), message="no answer")
    shown = texts(driver, ".msg.assistant")[-1]
    assert texts(driver, ".msg.user") == ["Shall I compare thee"]
    assert "tokens/s" in texts(driver, ".usage")[-1]
    assert by_id(driver, "error").text == ""

    reply = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                       json={"model": "tiny", "temperature": 0, "max_tokens": 12,
                             "messages": [{"role": "user", "content": "Shall I compare thee"}]})
    assert reply.status_code == 200, reply.text
    assert shown == reply.json()["choices"][0]["message"]["content"]
    assert "12 tokens" in texts(driver, ".usage")[-1] or reply.json()["choices"][0]["finish_reason"] == "stop"

    # the key stays in memory: not in localStorage, sessionStorage (remember is not ticked) or the URL
    stored = driver.execute_script("return [localStorage.length, sessionStorage.length]")
    assert stored == [0, 0] and token not in driver.current_url

    png = driver.get_screenshot_as_png()
    (tmp_path / "chat.png").write_bytes(png)
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 16 and pixels.std() > 0.02, "the screenshot looks blank"


def test_stop_frees_the_row_and_the_page_stays_usable(driver, server):
    url, app, token = server
    engine = app.state.served["long"].engine
    open_page(driver, url, token)
    settings(driver, "long", max_tokens=4000)
    say(driver, "Tell me everything")
    wait(driver, lambda: texts(driver, ".msg.assistant") and texts(driver, ".msg.assistant")[-1],
         message="no streamed text")
    assert by_id(driver, "stop").is_enabled() and engine.active == 1, "the answer ended before Stop"
    by_id(driver, "stop").click()
    deadline = time.monotonic() + 3
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0, "the engine kept generating after Stop"
    wait(driver, lambda: by_id(driver, "send").is_enabled() and not by_id(driver, "stop").is_enabled())
    assert by_id(driver, "error").text == ""
    assert "stopped" in texts(driver, ".usage")[-1]

    by_id(driver, "new-chat").click()
    assert texts(driver, ".msg") == []
    settings(driver, "tiny", max_tokens=4)
    say(driver, "And again")
    wait(driver, lambda: texts(driver, ".usage") and by_id(driver, "send").is_enabled(), message="no answer")
    assert len(texts(driver, ".msg.assistant")) == 1 and by_id(driver, "error").text == ""
