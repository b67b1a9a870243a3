"""The web page in a real browser: headless Chromium, driven over the DevTools protocol, against
a real `python -m serve` with a non-ASCII API key on a loopback port. The page asks for the key
(and sends its UTF-8 bytes), then loads the indices; a text search renders cards whose thumbnails
really load (signed URLs, no key in the <img>); an image search previews the query image; the
zero-shot panel calls /classify; the filter box narrows a search and shows a bad filter's error.
A screenshot of the results is written to runs/test-screenshots/page.png for a person to see."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import Browser, set_file
from tests.conftest import REPO_ROOT, running_service
from tests.serve_support import make_artifact, make_index, make_shard, read_samples

pytestmark = pytest.mark.slow

SAMPLES = 24
KEY = "page-clé-ключ"  # not even latin-1: the page must send its UTF-8 bytes
MAX_K = 16
SCREENSHOT = REPO_ROOT / "runs" / "test-screenshots" / "page.png"

# the visible result cards' images, each loaded and decoded (checked in the page)
VISIBLE_IMAGES_LOADED = """(() => {
  const cards = [...document.querySelectorAll("#results .result-card")];
  const visible = cards.filter((c) => c.getBoundingClientRect().top < innerHeight);
  const images = visible.map((c) => c.querySelector("img"));
  return visible.length > 0 && images.every((i) => i && i.complete && i.naturalWidth > 0)
    ? images.length : 0;
})()"""


SHARDS: dict[str, str] = {}  # server URL -> the shard its index was built from


def _shard(server: str) -> str:
    return SHARDS[server]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m serve` with a tiny random model, 24 synthetic images and an API key."""
    root = tmp_path_factory.mktemp("page")
    artifact = make_artifact(root)
    shard = make_shard(root / "synth", SAMPLES)
    index = make_index(artifact, shard, root / "index")
    env = {"DUET_API_KEY": KEY, "DUET_MAX_K": str(MAX_K), "DUET_ACCESS_LOG": "false"}
    with running_service(artifact, index, env=env) as base:
        SHARDS[base] = shard
        yield base


@pytest.fixture(scope="module")
def page(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """The page, opened once, with the API key entered as a person would."""
    browser = Browser(tmp_path_factory.mktemp("profile"))
    try:
        browser.goto(f"{server}/")
        browser.wait_for("document.querySelector('#status').textContent.includes('API key')")
        assert browser.evaluate("document.querySelector('#index').options.length") == 0
        browser.evaluate(
            f"(() => {{ const key = document.querySelector('#api-key'); key.value = {KEY!r};"
            " key.dispatchEvent(new Event('change')); })()"
        )
        options = "[...document.querySelector('#index').options].map((o) => o.textContent)"
        assert browser.wait_for(f"{options}.length && {options}") == [f"default ({SAMPLES})"]
        yield browser
    finally:
        browser.close()


def search_text(page: Browser, text: str, k: int) -> str:
    """Type a query and submit it; the status line once the search finished."""
    page.evaluate(
        f"(() => {{ document.querySelector('#query').value = {text!r};"
        f" document.querySelector('#k').value = {k};"
        " document.querySelector('#search-form').requestSubmit(); })()"
    )
    return page.wait_for(
        "(() => { const s = document.querySelector('#status').textContent;"
        " return !s.startsWith('searching') && s; })()"
    )


def test_text_search_shows_thumbnails_and_each_caption_once(page: Browser) -> None:
    status = search_text(page, "a red circle", 500)  # k is bounded by the service's max_k
    assert status.startswith(f'{MAX_K} results for "a red circle"'), status
    assert page.evaluate("document.querySelector('#k').value") == str(MAX_K)
    assert page.wait_for(VISIBLE_IMAGES_LOADED) >= 4
    cards = page.evaluate(
        "[...document.querySelectorAll('.result-card')].map((c) => ({"
        " text: c.textContent, caption: c.querySelector('.caption').textContent,"
        " src: c.querySelector('img').getAttribute('src'),"
        " lazy: c.querySelector('img').loading,"
        " score: Number(c.querySelector('.score').textContent) }))"
    )
    assert len(cards) == MAX_K
    for card in cards:
        assert card["text"].count(card["caption"]) == 1  # the caption once, not twice
        assert card["src"].startswith("/thumbnails/default/") and "sig=" in card["src"]
        assert card["lazy"] == "lazy"
    scores = [card["score"] for card in cards]
    assert scores == sorted(scores, reverse=True)
    page.screenshot(SCREENSHOT)


def test_image_search_previews_the_query_and_clears_the_text(page: Browser) -> None:
    search_text(page, "a blue square", 6)
    thumbnail = page.evaluate("document.querySelector('.result-card img').getAttribute('src')")
    set_file(page, "#image-input", thumbnail, "query.webp")
    status = page.wait_for(
        "(() => { const s = document.querySelector('#status').textContent;"
        " return s.includes('results for image') && s; })()"
    )
    assert status.startswith("6 results for image query.webp"), status
    assert page.evaluate("document.querySelector('#query').value") == ""
    assert page.evaluate("document.querySelector('#query-preview').hidden") is False
    assert page.wait_for("document.querySelector('#query-image').naturalWidth") > 0
    assert page.wait_for(VISIBLE_IMAGES_LOADED)
    page.screenshot(SCREENSHOT.with_name("page-image-search.png"))


def test_zero_shot_panel_classifies_an_image(page: Browser) -> None:
    thumbnail = page.evaluate("document.querySelector('.result-card img').getAttribute('src')")
    set_file(page, "#classify-image", thumbnail, "shape.webp")
    page.evaluate(
        "(() => { document.querySelector('#labels').value = 'red circle, blue square, green star';"
        " document.querySelector('#classify-form').requestSubmit(); })()"
    )
    items = page.wait_for(
        "(() => { const li = [...document.querySelectorAll('#predictions li')];"
        " return li.length && li.map((l) => l.textContent); })()"
    )
    assert len(items) == 3
    labels = {item.split(":")[0] for item in items}
    assert labels == {"red circle", "blue square", "green star"}
    total = sum(float(item.split(":")[1].strip().rstrip("%")) for item in items)
    assert total == pytest.approx(100, abs=0.5)


def test_near_duplicate_control_thins_the_results(page: Browser) -> None:
    assert page.evaluate("document.querySelector('#dedup-threshold').disabled") is True
    page.evaluate(
        "(() => { const box = document.querySelector('#dedup'); box.checked = true;"
        " box.dispatchEvent(new Event('change'));"
        " document.querySelector('#dedup-threshold').value = '0.5'; })()"
    )
    assert page.evaluate("document.querySelector('#dedup-threshold').disabled") is False
    status = search_text(page, "a red circle", MAX_K)
    shown = int(status.split()[0])
    # a random tiny model's embeddings of similar pictures: most are within cosine 0.5
    assert 1 <= shown < MAX_K, status
    page.evaluate(
        "(() => { const box = document.querySelector('#dedup'); box.checked = false;"
        " box.dispatchEvent(new Event('change')); })()"
    )


def test_filter_box_narrows_the_results_and_shows_errors(page: Browser, server: str) -> None:
    assert "color (string)" in page.evaluate("document.querySelector('#filter-fields').textContent")
    set_filter = "(() => {{ document.querySelector('#filter').value = {!r}; }})()"
    page.evaluate(set_filter.format('{"color": "red"}'))
    status = search_text(page, "a circle", MAX_K)
    reds = sum(s.meta["color"] == "red" for s in read_samples(_shard(server)))
    assert status.startswith(f"{min(reds, MAX_K)} results"), status
    assert 0 < reds < SAMPLES
    page.screenshot(SCREENSHOT.with_name("page-filter.png"))
    page.evaluate(set_filter.format('{"colour": "red"}'))
    status = search_text(page, "a circle", 5)
    assert status.startswith("search failed: body.filter: field 'colour' is not"), status
    page.evaluate(set_filter.format('{"color": '))
    assert search_text(page, "a circle", 5).startswith("search failed: the filter is not JSON")
    assert page.evaluate("document.querySelector('#status').className") == "error"
    page.evaluate(set_filter.format(""))


def test_page_shows_a_failed_search(page: Browser) -> None:
    status = search_text(page, "x" * 1500, 5)  # over DUET_MAX_TEXT_CHARS
    assert status.startswith("search failed: body.text"), status
    assert page.evaluate("document.querySelector('#status').className") == "error"
    assert page.evaluate("document.querySelectorAll('.result-card').length") == 0


def test_keyboard_reaches_the_image_search(page: Browser) -> None:
    zone = page.evaluate(
        "(() => { const z = document.querySelector('#drop-zone');"
        " return [z.tabIndex, z.getAttribute('role')]; })()"
    )
    assert zone == [0, "button"]
    assert Path(SCREENSHOT).is_file()
