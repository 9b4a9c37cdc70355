"""The web chat page at `/` in headless Chromium (Debian's chromium and
chromium-driver): type a message, press Send, watch the answer stream in.
Saves a screenshot to target/e2e/webchat.png."""
import os
import shutil
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from conftest import OUT


def browser():
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromium-driver (Debian packages) are required"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1000,800"]:
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_web_chat_streams_an_answer(server):
    b = browser()
    try:
        b.get(server.url + "/")
        assert "TensorLogic" in b.title
        # The page learns the model id from /v1/models.
        deadline = time.time() + 10
        while "qwen" not in b.find_element(By.ID, "model").text:
            assert time.time() < deadline, "model id never shown"
            time.sleep(0.1)
        b.find_element(By.ID, "input").send_keys("Write one sentence about the sea.")
        b.find_element(By.ID, "send").click()
        # Streamed: text appears while the Send button is still disabled
        # (the answer is not complete yet), then the button comes back.
        seen_partial = False
        deadline = time.time() + 180
        while True:
            msgs = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            text = msgs[-1].text if msgs else ""
            busy = not b.find_element(By.ID, "send").is_enabled()
            if text and busy:
                seen_partial = True
            if text and not busy:
                break
            assert not b.find_elements(By.CSS_SELECTOR, ".msg.error"), \
                b.find_element(By.CSS_SELECTOR, ".msg.error").text
            assert time.time() < deadline, "no answer in 180 s"
            time.sleep(0.02)
        assert seen_partial, "the answer did not stream (it appeared all at once)"
        assert len(text.split()) >= 3
        assert b.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text == "Write one sentence about the sea."
        os.makedirs(OUT, exist_ok=True)
        b.save_screenshot(os.path.join(OUT, "webchat.png"))
    finally:
        b.quit()
