"""The chat page of `cake serve` (GET /) in a real headless Chromium, driven by
selenium through Debian's chromedriver, and its markdown endpoint."""

from __future__ import annotations

import json
import shutil
import urllib.request

import openai
import pytest

from tests.serving import get, greedy_chat, smollm_server

KEY = "web-key"
NAME = "smol"
PARIS = "What is the capital of France? Answer in one sentence."
ITALY = "And of Italy?"
CODE = "Show a Python function that adds two numbers, in a fenced code block."
CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
    None,
)
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server():
    yield from smollm_server(KEY, NAME, context=2048, parallel=2)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "needs Chromium and chromedriver (Debian: apt-get install chromium "
            "chromium-driver; `make install-test` does it as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        opts.add_argument(arg)  # no sandbox: the tests may run as root
    d = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    yield d
    d.quit()


@pytest.fixture(scope="module")
def page(server, browser):
    """The page with the key entered (it loads without one)."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"http://127.0.0.1:{server}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "API key" in el(d, "#status").text)
    el(browser, "#api-key").send_keys(KEY, Keys.TAB)  # change: the models load
    wait.until(lambda d: el(d, "#model").get_attribute("value") == NAME)
    assert el(browser, "#status").text == ""
    return browser


def el(d, css: str):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, css)


def els(d, css: str) -> list:
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, css)


def setting(d, field: str, value: str) -> None:
    e = el(d, f"#{field}")
    e.clear()
    e.send_keys(value)


def ask(d, text: str, timeout: float = 60):
    """Send `text` and return the answer's element once it stopped streaming."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(els(d, ".msg.assistant"))
    el(d, "#prompt").send_keys(text)
    el(d, "#send").click()
    WebDriverWait(d, 10).until(lambda d: len(els(d, ".msg.assistant")) > before)
    msg = els(d, ".msg.assistant")[-1]
    WebDriverWait(d, timeout).until(
        lambda _: msg.get_attribute("data-state") != "streaming"
    )
    return msg


def metric(port: int, name: str) -> float:
    for line in get(port, "/metrics", KEY).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_the_page_and_its_files_need_no_key(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/", timeout=10) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    # scripts and styles from the server only: no inline ones, no others' hosts
    assert "default-src 'self';" in csp and "unsafe-inline" not in csp
    assert '<script src="/ui/static/chat.js"' in html
    for path in ("/ui/static/chat.js", "/ui/static/chat.css", "/ui/pygments.css"):
        assert get(server, path)


def test_markdown_is_rendered_and_raw_html_escaped(server):
    text = (
        "**bold** and <script>alert(1)</script>\n\n"
        "```python\ndef add(a, b):\n    return a + b\n```\n\n"
        "[x](javascript:alert(1))"
    )
    req = urllib.request.Request(
        f"http://127.0.0.1:{server}/ui/markdown", data=text.encode()
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        html = r.read().decode()
    assert "<strong>bold</strong>" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '<pre><code class="language-python"><span class="k">def</span>' in html
    assert "<a " not in html and "[x](javascript:alert(1))" in html  # not a link


def test_an_answer_streams_as_the_api_gives_it_and_the_chat_goes_on(page, client):
    setting(page, "temperature", "0")
    setting(page, "max-tokens", "32")
    first, second = greedy_chat(client, NAME, PARIS, ITALY, max_tokens=32)
    msg = ask(page, PARIS)
    assert msg.get_attribute("data-state") == "done"
    assert el(msg, ".body").text == first
    # the second turn is sent with the first as history
    assert el(ask(page, ITALY), ".body").text == second
    assert [e.text for e in els(page, ".msg.user .body")] == [PARIS, ITALY]


def test_markdown_in_an_answer_is_rendered(page):
    el(page, "#new-chat").click()
    assert els(page, ".msg") == []
    setting(page, "temperature", "0")
    setting(page, "max-tokens", "100")
    msg = ask(page, CODE)
    assert msg.get_attribute("data-state") == "done"
    code = el(msg, "pre code.language-python")
    assert "def " in code.text and el(code, "span.k").text == "def"


def test_stop_ends_a_long_answer(page, server):
    el(page, "#new-chat").click()
    setting(page, "temperature", "0")
    setting(page, "max-tokens", "1500")
    from selenium.webdriver.support.ui import WebDriverWait

    generated = metric(server, "cake_generation_tokens_total")
    el(page, "#prompt").send_keys("Write a long story about a cat named Tom.")
    el(page, "#send").click()
    WebDriverWait(page, 30).until(lambda d: "Tom" in el(d, ".msg.assistant").text)
    assert el(page, "#stop").is_displayed() and not el(page, "#send").is_displayed()
    el(page, "#stop").click()
    msg = el(page, ".msg.assistant")
    WebDriverWait(page, 10).until(
        lambda _: msg.get_attribute("data-state") != "streaming"
    )
    assert msg.get_attribute("data-state") == "stopped"
    assert "Stopped." in msg.text
    assert el(page, "#send").is_displayed() and not el(page, "#stop").is_displayed()
    # the server cancelled the request well before its 1500 tokens
    WebDriverWait(page, 10).until(
        lambda _: json.loads(get(server, "/health"))["running"] == 0
    )
    assert metric(server, "cake_generation_tokens_total") - generated < 1500
