"""The web page in headless Chromium (Debian chromium + chromium-driver, driven by selenium) against a live server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_system_package, serve_in_thread

from nmt.translator import Translator
from service.app import create_app
from service.settings import Settings

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def live_url(tiny_model_dir: Path) -> Iterator[str]:
    """The app under uvicorn in a thread of this process."""
    settings = Settings(model_dir=tiny_model_dir, max_alignment_cells=2000)  # "a b c d": 60; 40 letters: 2,706
    app = create_app(settings, Translator.load(tiny_model_dir, threads=1))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    require_system_package(CHROMIUM and CHROMEDRIVER,
                           "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_type_translate_and_read_the_heat_map(browser, live_url):
    browser.get(live_url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "src → tgt" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "source").send_keys("a b c d")
    beam = browser.find_element(By.ID, "beam")
    beam.clear()
    beam.send_keys("4")
    browser.find_element(By.ID, "translate").click()
    wait.until(lambda d: d.find_element(By.ID, "translation").text)
    assert browser.find_element(By.ID, "translation").text == "d c b a"
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    alternatives = browser.find_elements(By.CSS_SELECTOR, "#alternatives li")
    assert alternatives and all(item.text.endswith(")") for item in alternatives)

    # Pieces without SentencePiece's word mark (a screen reader read "lower one eighth block"): word starts in bold.
    heads = browser.find_elements(By.CSS_SELECTOR, "#heatmap thead th")[1:]
    columns = [th.text for th in heads]
    rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")
    assert columns == ["a", "b", "c", "d", "(end)"]
    assert [th.get_attribute("class") for th in heads] == ["word"] * 4 + [""]
    assert [row.find_element(By.TAG_NAME, "th").text for row in rows] == ["d", "c", "b", "a", "(end)"]
    assert browser.find_element(By.ID, "status").text == "Translated, with 2 alternative(s)."
    weights = [[float(td.get_attribute("data-weight")) for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert all(len(w) == len(columns) and abs(sum(w) - 1) < 0.01 for w in weights)
    # the model learnt to reverse: the t-th output piece attends most to the t-th source piece from the end
    assert [w.index(max(w)) for w in weights[:4]] == [3, 2, 1, 0]
    # A cell's description names its pieces as the headers do (it said "▁d ← ▁a").
    assert rows[0].find_element(By.TAG_NAME, "td").get_attribute("title").startswith("d ← a: 0.")
    # The character count stays the text box's description (a translation took it away for screen readers).
    assert browser.find_element(By.ID, "source").get_attribute("aria-describedby") == "count"
    # Not colour alone: each cell holds its weight in percent for screen readers, shown on demand.
    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody td")
    percents = [int(td.get_attribute("textContent")) for td in cells]
    assert all(abs(p - w * 100) <= 0.51 for p, w in zip(percents, [w for r in weights for w in r], strict=True))
    assert "percent" in browser.find_element(By.CSS_SELECTOR, "#heatmap caption").get_attribute("textContent")
    assert {td.value_of_css_property("color") for td in cells} == {"rgba(0, 0, 0, 0)"}
    browser.find_element(By.ID, "numbers").click()
    assert "rgba(0, 0, 0, 0)" not in {td.value_of_css_property("color") for td in cells}


def test_a_text_too_long_for_its_heat_map_is_translated_without_one(browser, live_url):
    browser.get(live_url)
    text = " ".join("abcdefghijklmnop"[i % 16] for i in range(40))
    browser.find_element(By.ID, "source").send_keys(text)
    browser.find_element(By.ID, "translate").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "translation").text)
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert "too long" in browser.find_element(By.ID, "heatmap-note").text


def test_errors_are_shown_readably_in_place_of_the_last_translation(browser, live_url):
    browser.get(live_url)
    browser.find_element(By.ID, "source").send_keys("a b")
    browser.find_element(By.ID, "translate").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "translation").text == "b a")
    # The service's refusals in the page's words: 429 with its wait, 401 pointing at the field.
    browser.execute_script("""
        window.fetch = async (url) => url !== "/v1/translate" ? new Response("{}") : new Response(JSON.stringify(
            {error: {code: "rate_limited", message: "rate limit exceeded", fields: []}}),
            {status: 429, headers: {"Content-Type": "application/json", "Retry-After": "7"}});""")
    browser.find_element(By.ID, "translate").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert error.text == "Too many requests for now: try again in 7 s."
    # The earlier translation, its scores and heat map stayed on screen under the error, as if they answered it.
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_the_api_key_outlives_a_reload_but_not_the_tab(browser, live_url):
    browser.get(live_url)
    browser.find_element(By.ID, "apikey").send_keys("k-123")
    browser.refresh()  # it had to be typed again after every reload
    assert browser.find_element(By.ID, "apikey").get_attribute("value") == "k-123"
    browser.execute_script("sessionStorage.clear()")  # what closing the tab does
    browser.refresh()
    assert browser.find_element(By.ID, "apikey").get_attribute("value") == ""


def test_the_form_is_checked_before_sending(browser, live_url):
    # A beam size of 2.5 went to the service, and n-best was rewritten to 2.5 and named in its 422.
    browser.get(live_url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "src → tgt" in d.find_element(By.ID, "model-info").text)
    browser.execute_script("window.calls = 0; const real = window.fetch;"
                           "window.fetch = (url, o) => { window.calls++; return real(url, o); };")
    browser.find_element(By.ID, "source").send_keys("a b")
    for value in ("2.5", "0", "17", ""):
        beam = browser.find_element(By.ID, "beam")
        beam.clear()
        beam.send_keys(value)
        browser.find_element(By.ID, "translate").click()
        assert browser.find_element(By.ID, "error").text == "Beam size must be a whole number from 1 to 16."
        assert beam.get_attribute("aria-invalid") == "true"
        assert browser.find_element(By.ID, "nbest").get_attribute("value") == "3"
    assert browser.execute_script("return window.calls") == 0
    beam.clear()
    beam.send_keys("5")
    source = browser.find_element(By.ID, "source")
    source.clear()
    source.send_keys("a " * 1001)  # over the service's 2,000 characters: said as it is typed, and before sending
    assert browser.find_element(By.ID, "count").text == "2002 / 2000 characters"
    browser.find_element(By.ID, "translate").click()
    assert browser.find_element(By.ID, "error").text.startswith("The text has 2002 characters, more than the 2000")
    assert browser.execute_script("return window.calls") == 0 and beam.get_attribute("aria-invalid") is None


def test_what_cannot_be_sent_is_said_in_the_words_of_its_field(browser, live_url):
    browser.get(live_url)
    WebDriverWait(browser, 30).until(lambda d: "src → tgt" in d.find_element(By.ID, "model-info").text)
    browser.execute_script("window.calls = 0; const real = window.fetch; window.fetch = (url, o) => {"
                           "window.calls++; window.sentKey = ((o || {}).headers || {})['X-API-Key'];"
                           "return real(url, o); };")
    source, key = browser.find_element(By.ID, "source"), browser.find_element(By.ID, "apikey")
    # Only invisible characters: an empty "translation" with "score n/a" came back.
    browser.execute_script("arguments[0].value = '\\u200b\\u0001 \\u200b'", source)
    browser.find_element(By.ID, "translate").click()
    assert browser.find_element(By.ID, "error").text == "Type a text to translate."
    assert source.get_attribute("aria-describedby") == "count error"
    # A key with a non-breaking hyphen, as pasted text has: fetch refused it, said as "Could not reach the service".
    source.send_keys("a b")
    key.send_keys("key\u2011secret")
    browser.find_element(By.ID, "translate").click()
    assert browser.find_element(By.ID, "error").text.startswith("The API key holds U+2011, which no key of this")
    assert key.get_attribute("aria-invalid") == "true" and source.get_attribute("aria-invalid") is None
    assert source.get_attribute("aria-describedby") == "count"
    # Latin-1, which a browser sends but no key of the service's holds (NMT_API_KEYS: visible ASCII).
    key.clear()
    key.send_keys("clé")
    browser.find_element(By.ID, "translate").click()
    assert browser.find_element(By.ID, "error").text.startswith("The API key holds U+00E9")
    assert browser.execute_script("return window.calls") == 0
    key.clear()
    key.send_keys("  s3cret-key  ")  # the spaces a paste brings at the ends are not sent
    browser.find_element(By.ID, "translate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "translation").text == "b a")
    assert key.get_attribute("aria-invalid") is None
    assert browser.execute_script("return window.sentKey") == "s3cret-key"
    browser.execute_script("sessionStorage.clear()")


def test_the_beam_size_chosen_stays_when_the_model_information_comes_late(browser, live_url):
    # /v1/models failed at load, and the first translation after it loaded the information again and put the
    # model's beam size back in the field: the next Translate used beam 5 with n-best cut to it.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/models"]})
    try:
        browser.get(live_url)
        info = browser.find_element(By.ID, "model-info")
        WebDriverWait(browser, 30).until(lambda d: "unavailable" in info.text)
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    for field, value in (("beam", "7"), ("nbest", "6")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "source").send_keys("a b c")
    browser.find_element(By.ID, "translate").click()
    WebDriverWait(browser, 30).until(lambda d: "src → tgt" in info.text)
    assert browser.find_element(By.ID, "beam").get_attribute("value") == "7"
    assert browser.find_element(By.ID, "nbest").get_attribute("value") == "6"


def test_a_blank_text_drops_the_request_under_way_and_a_second_click_sends_nothing(browser, live_url):
    # A blank text's error stood above the late answer of the text before, shown as if it were this one's; and each
    # click of a slow request sent it again, each counted against the rate limit.
    browser.get(live_url)
    browser.execute_script("""
        const real = window.fetch; window.calls = 0;
        window.fetch = (url, options) => url !== "/v1/translate" ? real(url, options) : (window.calls++,
            new Promise((resolve, reject) => setTimeout(() => real(url, options).then(resolve, reject), 1500)));""")
    source = browser.find_element(By.ID, "source")
    source.send_keys("a b c")
    for _ in range(3):
        browser.find_element(By.ID, "translate").click()
    assert browser.execute_script("return window.calls") == 1
    source.clear()
    browser.find_element(By.ID, "translate").click()
    browser.execute_script("return new Promise((done) => setTimeout(done, 2500));")  # past the first's answer
    assert browser.find_element(By.ID, "error").text == "Type a text to translate."
    assert not browser.find_element(By.ID, "result").is_displayed()
    assert browser.find_element(By.ID, "status").text == ""


def test_a_long_word_wraps_instead_of_widening_the_page(browser, live_url):
    browser.get(live_url)
    browser.execute_script("""
        window.fetch = async (url) => new Response(JSON.stringify(url !== "/v1/translate" ? {} : {translations: [
            {text: "x".repeat(400), score: -1, alternatives: [{text: "y".repeat(400), score: -2}],
             alignment: null}], model: "m", elapsed_ms: 1}), {status: 200,
            headers: {"Content-Type": "application/json"}});""")
    browser.find_element(By.ID, "source").send_keys("x")
    browser.find_element(By.ID, "translate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "translation").text)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def test_only_the_latest_request_is_shown(browser, live_url):
    # Ctrl+Enter sent a second request while one ran, and the first one's late answer stayed under the second text.
    browser.get(live_url)
    browser.execute_script("""
        const real = window.fetch; let calls = 0;
        window.fetch = (url, options) => (url === "/v1/translate" && calls++ === 0)
            ? new Promise((resolve, reject) => setTimeout(() => real(url, options).then(resolve, reject), 1500))
            : real(url, options);""")
    source = browser.find_element(By.ID, "source")
    source.send_keys("a b c")
    browser.find_element(By.ID, "translate").click()
    assert browser.find_element(By.ID, "status").text == "translating…"
    source.clear()
    source.send_keys("d e")
    browser.find_element(By.ID, "translate").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "translation").text == "e d")
    browser.execute_script("return new Promise((done) => setTimeout(done, 2500));")  # past the first's answer
    assert browser.find_element(By.ID, "translation").text == "e d"
    assert browser.find_element(By.ID, "status").text.startswith("Translated")


def test_a_heat_map_too_large_to_draw_is_a_note_and_n_best_follows_the_beam(browser, live_url):
    # A 514 x 534 table took seconds to draw, froze the page and could not be read.
    browser.get(live_url)
    browser.execute_script("""
        const pieces = Array.from({length: 300}, (_, i) => "p" + i);
        const weights = pieces.map(() => pieces.map(() => 1 / 300));
        window.fetch = async () => new Response(JSON.stringify({translations: [{text: "long", score: -1,
            alternatives: [{text: "one\\n\\ntwo", score: -2}],
            alignment: {source: pieces, target: pieces, weights}}], model: "m", elapsed_ms: 1}),
            {status: 200, headers: {"Content-Type": "application/json"}});""")
    browser.find_element(By.ID, "source").send_keys("x")
    for field, value in (("beam", "2"), ("nbest", "5")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "translate").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "translation").text == "long")
    assert "300 x 300 pieces are too many to draw" in browser.find_element(By.ID, "heatmap-note").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#heatmap td")
    assert browser.find_element(By.ID, "nbest").get_attribute("value") == "2"  # was sent as 2, and still said 5
    assert browser.find_element(By.CSS_SELECTOR, "#alternatives li").text.startswith("one\n\ntwo")
    browser.find_element(By.ID, "source").clear()
    browser.find_element(By.ID, "translate").click()  # blank: no request
    assert browser.find_element(By.ID, "error").text == "Type a text to translate."


def test_the_api_documentation_renders_without_the_internet(browser, live_url):
    # Swagger UI's files come with the package (fastapi-offline); its default page loads them from a CDN.
    browser.get(f"{live_url}/docs")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/translate", "/v1/score", "/v1/health"} <= paths
