"""The web page of `cmatrix serve` in a real headless browser (Debian's chromium, driven by
selenium through chromedriver): a typed message gets a streamed answer, and the rank table
shows the cluster. Skipped, with the reason, where chromium or its driver is not installed
(.ci/run installs both)."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import ROOT
from test_chat_serve_mpi import start_server

for _module in ("torch", "transformers", "tokenizers", "jinja2", "uvicorn"):
    pytest.importorskip(_module)
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver "
           "(apt-get install chromium chromium-driver; .ci/run does)")]


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_streams_an_answer_and_shows_the_ranks(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    sys.path.insert(0, str(ROOT / "jobs"))
    from tiny_llama import build

    model = build(tmp_path / "tiny", vocab_size=320, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, scale=8.0)
    server = start_server(2, model, "--name", "browser-tiny")
    try:
        browser.get(server.url + "/")
        assert "browser-tiny" in browser.title
        wait = WebDriverWait(browser, 60)
        # the dashboard: one row per rank, with its host and backend
        rows = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#ranks tbody tr") or False)
        assert len(rows) == 2
        assert "numpy" in rows[0].text and "0.500" in rows[0].text
        box = browser.find_element(By.ID, "input")
        box.send_keys("Hello from the browser")
        box.send_keys(Keys.ENTER)
        answer = wait.until(lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                                       if e.text] or False)
        assert answer[0]
        # the stream ended with its usage note, and the rank table shows this generation's speed
        note = wait.until(lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.note")
                                     if "prompt tokens" in e.text] or False)
        assert "generated" in note[0]

        def speed_rows(b):
            rows = [r.find_elements(By.TAG_NAME, "td")
                    for r in b.find_elements(By.CSS_SELECTOR, "#ranks tbody tr")]
            return [cells for cells in rows if cells[6].text not in ("", "–")] or False

        cells = wait.until(speed_rows)
        assert float(cells[0][6].text) > 0  # compute ms per token
        assert "answered" in browser.find_element(By.ID, "summary").text
        user = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
        assert [u.text for u in user] == ["Hello from the browser"]
    finally:
        assert server.stop() == 0, server.log
