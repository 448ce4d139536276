"""The browser chat served at / by `python -m hydra.serve`, in a real headless Chromium (the system package,
driven by selenium through /usr/bin/chromedriver): the page loads, a message sent with Enter streams back
piece by piece, the finished reply equals the library's own greedy decoding, and the stats line shows tokens/s
and tau; with the Hydra toggle off the same reply comes back by plain decoding (tau 1.00).

Skipped, with the reason, where Chromium, its driver or selenium is not installed. Set HYDRA_SCREENSHOT_DIR to
keep the screenshots (README: assets/web_chat.png comes from the slow test on the default model)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import Server, save_tiny_served_model, serving_in_thread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no Chromium / chromedriver installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytest.importorskip("fastapi")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from hydra.inference.loading import load_model, render_prompt  # noqa: E402
from hydra.model.generate import DecodeConfig, generate  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,760"]


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def chat_turn(driver, text: str, timeout: float = 120) -> tuple[str, str, list[int]]:
    """Send `text` from the page; returns (reply, stats line, lengths of the reply seen while it streamed)."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if len(replies) > before:
            reply = replies[-1]
            done = reply.get_attribute("data-done")
            content = reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
            if done:
                stats = reply.find_element(By.CSS_SELECTOR, ".stats").get_attribute("textContent")
                return content, stats, seen
            if content and (not seen or len(content) != seen[-1]):
                seen.append(len(content))
        time.sleep(0.02)
    raise AssertionError(f"no finished reply within {timeout} s")


def expected_reply(model, history: list[dict], max_tokens: int) -> str:
    ids = render_prompt(model.tokenizer, history)
    out = generate(model, ids, DecodeConfig(max_new_tokens=max_tokens))
    return model.tokenizer.decode(out.tokens, skip_special_tokens=True)


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("HYDRA_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 1000
    return path


def run_conversation(driver, server: Server, model, max_tokens: int, first: str, second: str) -> None:
    driver.get(server.url + "/")
    deadline = time.monotonic() + 30
    while not driver.find_element(By.ID, "model").text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.find_element(By.ID, "model").text, "the page did not load the model list"
    assert driver.find_element(By.ID, "hydra").is_selected()

    reply, stats, seen = chat_turn(driver, first)
    history = [{"role": "user", "content": first}]
    assert reply == expected_reply(model, history, max_tokens) and reply
    assert len(seen) >= 2, f"the reply did not stream (lengths seen: {seen})"
    assert stats.startswith("hydra") and "tokens/s" in stats and "tau " in stats, stats

    driver.find_element(By.ID, "hydra").click()  # plain decoding: same greedy reply, tau 1
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": second}]
    reply2, stats2, _ = chat_turn(driver, second)
    assert reply2 == expected_reply(model, history, max_tokens)
    assert stats2.startswith("plain") and "tau 1.00" in stats2, stats2


def test_web_chat_streams_and_toggles(tmp_path, browser):
    heads = save_tiny_served_model(tmp_path)
    server = Server("--model", str(heads), "--dtype", "float32", "--max-tokens", "48",
                    log=tmp_path / "server.log")
    try:
        model, _ = load_model(str(heads), dtype="float32", device="cpu")
        run_conversation(browser, server, model, 48, "Hello, who are you?", "Tell me more.")
        screenshot(browser, "web_chat_tiny.png", tmp_path)
    finally:
        server.stop()


def test_web_chat_new_chat_mid_reply_and_a_failed_reply(tmp_path, browser):
    """"New chat" pressed while a reply streams starts a clean conversation (the old reply must not land in
    it), and a reply that fails mid-stream shows the server's message. In-process server, to hold a reply
    mid-stream and to make decoding fail."""
    from hydra.serve.app import create_app
    from hydra.serve.engine import Engine

    model, _ = load_model(str(save_tiny_served_model(tmp_path)), dtype="float32", device="cpu")
    engine = Engine(model, has_heads=True)
    working, gate, prompts = engine.steps, threading.Event(), []

    def held(job):  # the reply's first piece, then a wait for the gate
        prompts.append(job.prompt_ids)
        steps = working(job)

        def gen():
            for i, item in enumerate(steps):
                if i == 1:
                    gate.wait(60)
                yield item
        return gen()

    engine.steps = held
    with serving_in_thread(create_app(engine, "heads", max_tokens=8)) as url:
        browser.get(url + "/")
        deadline = time.monotonic() + 30
        while not browser.find_element(By.ID, "model").text and time.monotonic() < deadline:
            time.sleep(0.05)
        box = browser.find_element(By.ID, "input")
        box.send_keys("first", Keys.ENTER)
        while not prompts and time.monotonic() < deadline:
            time.sleep(0.05)
        browser.find_element(By.ID, "reset").click()  # while the first reply is held mid-stream
        gate.set()
        while browser.find_element(By.ID, "send").get_attribute("disabled") and time.monotonic() < deadline:
            time.sleep(0.05)
        chat_turn(browser, "second")
        assert prompts[1] == render_prompt(model.tokenizer, [{"role": "user", "content": "second"}])

        def failing(job):
            yield from ()
            raise RuntimeError("boom")

        engine.steps = failing
        _, stats, _ = chat_turn(browser, "third")
        assert stats == "error: decoding failed: RuntimeError: boom", stats


@pytest.mark.slow
def test_web_chat_on_the_default_model(tmp_path, browser):
    """The shipped heads on the default model (fp32, so the page's greedy reply is checked token for token);
    with HYDRA_SCREENSHOT_DIR=assets this writes the README's assets/web_chat.png."""
    server = Server("--dtype", "float32", "--max-tokens", "96", log=tmp_path / "server.log")
    try:
        model, _ = load_model(None, dtype="float32", device="cpu")
        run_conversation(browser, server, model, 96, "What are three tips for staying healthy?",
                         "Give me one more tip.")
        screenshot(browser, "web_chat.png", tmp_path)
    finally:
        server.stop()
