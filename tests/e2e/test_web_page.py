"""The web page in a real browser: headless Chromium, driven over the DevTools protocol, against
a real `python -m serve` with a non-ASCII API key on a loopback port. The page asks for the key
(and sends its UTF-8 bytes), then loads the indices; a text search renders cards whose thumbnails
really load (signed URLs, no key in the <img>); an image search previews the query image; the
zero-shot panel calls /classify; the filter box narrows a search and shows a bad filter's
error; a picture added through the page is found by the next search
and, deleted from its result card, is gone from the one after; a folder's pictures without
captions are shown by their file names.
Screenshots are written to runs/test-screenshots/ for a person to see."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.browser import Browser, set_file
from tests.conftest import REPO_ROOT, running_service
from tests.serve_support import (
    b64,
    make_artifact,
    make_index,
    make_shard,
    png,
    read_samples,
    write_lock_held,
)

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


ADD_FORM_SHOWN = "getComputedStyle(document.querySelector('#add-form')).display !== 'none'"
CARD_IDS = (
    "[...document.querySelectorAll('#results .result-card')].map((c) => Number(c.dataset.id))"
)
SHARDS: dict[str, str] = {}  # server URL -> the shard its index was built from
PHOTOS = ["beach.png", "china.jpg", "china.webp", "trip/market.jpg"]  # china.*: one stem, 2 keys


def photo_folder(root: Path) -> Path:
    """A folder of pictures as a camera leaves them: file names, no captions."""
    for i, name in enumerate(PHOTOS):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (60 * i, 200 - 40 * i, 90)).save(root / name)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m serve` with a tiny random model, 24 synthetic images and an API key; index
    "frozen", a copy that another process writes (so it is read-only here); and index
    "photos", built from a folder of pictures without captions."""
    root = tmp_path_factory.mktemp("page")
    artifact = make_artifact(root)
    shard = make_shard(root / "synth", SAMPLES)
    index = make_index(artifact, shard, root / "index")
    frozen = Path(shutil.copytree(index, root / "frozen"))
    photos = make_index(artifact, str(photo_folder(root / "folder")), root / "photos")
    env = {
        "DUET_API_KEY": KEY,
        "DUET_MAX_K": str(MAX_K),
        "DUET_ACCESS_LOG": "false",
        "DUET_INDICES": json.dumps({"frozen": str(frozen), "photos": str(photos)}),
    }
    with write_lock_held(frozen), running_service(artifact, index, env=env) as base:
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
        assert not browser.evaluate(ADD_FORM_SHOWN)  # changing the index needs the key
        browser.evaluate(
            f"(() => {{ const key = document.querySelector('#api-key'); key.value = {KEY!r};"
            " key.dispatchEvent(new Event('change')); })()"
        )
        options = "[...document.querySelector('#index').options].map((o) => o.textContent)"
        assert browser.wait_for(f"{options}.length && {options}") == [
            f"default ({SAMPLES})",
            f"frozen ({SAMPLES})",
            f"photos ({len(PHOTOS)})",
        ]
        assert browser.evaluate(ADD_FORM_SHOWN)
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
    reds = sum(s.meta["color"] == "red" for s in read_samples(SHARDS[server]))
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


def test_add_a_picture_find_it_delete_it(page: Browser) -> None:
    """The add form, then an image search for the same picture, then its card's delete button
    (dismissed once, then confirmed): the results are searched again without it."""
    picture = "data:image/png;base64," + b64(png(48, (250, 200, 20)))
    set_file(page, "#add-image", picture, "sun.png")
    page.evaluate(
        "(() => { document.querySelector('#add-caption').value = 'a yellow sun';"
        " document.querySelector('#add-form').requestSubmit(); })()"
    )
    added = page.wait_for(
        "(() => { const s = document.querySelector('#add-status').textContent;"
        " return s.startsWith('added') && s; })()"
    )
    new_id = int(added.split("#")[1].split()[0])
    assert new_id >= SAMPLES and added.endswith("to default"), added
    options = "[...document.querySelector('#index').options].map((o) => o.textContent)"
    assert page.wait_for(f"{options}[0] === 'default ({SAMPLES + 1})'")

    set_file(page, "#image-input", picture, "sun.png")
    page.wait_for(f"{CARD_IDS}[0] === {new_id}")
    assert page.evaluate("document.querySelector('.result-card .caption').textContent") == (
        "a yellow sun"
    )
    assert page.wait_for(VISIBLE_IMAGES_LOADED)  # the added picture's thumbnail loads too
    page.screenshot(SCREENSHOT.with_name("page-added.png"))

    delete_first = "document.querySelector('.result-card .delete').click()"
    assert "a yellow sun" in page.answer_dialog(delete_first, accept=False)
    assert page.evaluate(f"{CARD_IDS}[0]") == new_id  # dismissed: nothing deleted
    page.answer_dialog(delete_first, accept=True)
    assert page.wait_for(
        f"document.querySelector('#add-status').textContent === 'deleted #{new_id} from default'"
    )
    page.wait_for(f"{CARD_IDS}.length > 0 && !{CARD_IDS}.includes({new_id})")
    assert page.wait_for(f"{options}[0] === 'default ({SAMPLES})'")
    page.screenshot(SCREENSHOT.with_name("page-deleted.png"))


def choose_index(page: Browser, name: str) -> None:
    page.evaluate(
        f"(() => {{ const select = document.querySelector('#index'); select.value = {name!r};"
        " select.dispatchEvent(new Event('change')); })()"
    )


def test_an_index_written_elsewhere_offers_no_add_or_delete(page: Browser) -> None:
    delete_shown = (
        "getComputedStyle(document.querySelector('.result-card .delete')).display !== 'none'"
    )
    choose_index(page, "frozen")
    try:
        assert page.evaluate(ADD_FORM_SHOWN) is False
        assert search_text(page, "a red circle", 4).endswith("(index frozen)")
        assert page.evaluate(delete_shown) is False
    finally:
        choose_index(page, "default")
    assert page.evaluate(ADD_FORM_SHOWN) is True


def test_a_folders_pictures_without_captions_show_their_file_names(page: Browser) -> None:
    choose_index(page, "photos")
    try:
        assert search_text(page, "a picture", 10).startswith(f"{len(PHOTOS)} results")
        cards = page.evaluate(
            "[...document.querySelectorAll('.result-card')].map((c) => ({"
            " name: c.querySelector('.caption').textContent,"
            " file: c.querySelector('.caption').classList.contains('file-name'),"
            " alt: c.querySelector('img').alt }))"
        )
        assert sorted(card["name"] for card in cards) == PHOTOS
        assert all(card["file"] and card["alt"] == card["name"] for card in cards)
        page.wait_for(VISIBLE_IMAGES_LOADED)
        page.screenshot(SCREENSHOT.with_name("page-folder.png"))
    finally:
        choose_index(page, "default")
