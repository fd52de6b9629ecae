"""The web page end to end, in headless Chromium (Debian's `chromium`, driven by Playwright's
Python package with the system browser as its executable): a shared link shows its results,
typing a query updates the address, thumbnails load, a click opens the photo, "more like this"
shows similar images, scrolling loads the next pages, filters and the duplicates view work, and
a token given once in the address becomes a cookie that also authorises the thumbnails.

Screenshots go to the test's tmp_path (and to $CLIPDEX_SCREENSHOTS when set) for a reviewer.
CI installs the browser with `apt-get install -y chromium`; without it these tests are skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from live_server import LiveServer, copy_index

from retrieval.core.filters import Filters, parse_formats
from retrieval.search.query import Query
from server.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "web-page-test-token"
FIRST_CARD_IS = "(id) => document.querySelector('#grid .card')?.dataset.id === String(id)"
VIEWER_LOADED = """() => {
    const img = document.getElementById('viewer-img');
    return img.complete && img.naturalWidth > 0;
}"""
CARDS = "(n) => document.querySelectorAll('#grid .card').length === n"
SCROLLED_TO = """(n) => {
    window.scrollTo(0, document.body.scrollHeight);
    return document.querySelectorAll('#grid .card').length >= n;
}"""
GROUP_MEMBERS = "gs => gs.map(g => Array.from(g.querySelectorAll('.card')).map(c => Number(c.dataset.id)))"
THUMBS_LOADED = """(n) => {
    const imgs = Array.from(document.querySelectorAll('#grid .card img, #dups .card img')).slice(0, n);
    return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""

if not os.path.exists(CHROMIUM):
    pytest.skip(
        "Debian's chromium is not installed (CI: apt-get install -y chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")


@pytest.fixture(scope="module")
def served(corpus, tmp_path_factory) -> Path:
    return copy_index(corpus["dir"], tmp_path_factory.mktemp("web") / "index")


@pytest.fixture(scope="module")
def url(served, tiny_clip_model):
    with LiveServer(create_app(served, model=tiny_clip_model)) as address:
        yield address


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user-data dir
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
        )
        yield context
        context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert errors == [], errors  # no JavaScript error on the page


def shown_ids(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#grid .card", "cards => cards.map(c => c.dataset.id)")]


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=False)
    extra = os.environ.get("CLIPDEX_SCREENSHOTS")
    if extra:
        os.makedirs(extra, exist_ok=True)
        shutil.copyfile(path, Path(extra) / name)
    print(f"screenshot: {path}")
    return path


def test_search_click_and_more_like_this(url, page, local, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page.goto(f"{url}/?q=red+circle")  # a shared link shows its results
    page.wait_for_function(THUMBS_LOADED, arg=12)
    want = local.search_query(Query.text("red circle"), k=40)
    assert shown_ids(page) == [h.id for h in want]
    scores = page.eval_on_selector_all("#grid .card .score", "s => s.map(e => e.textContent)")
    assert scores == [f"{h.score:.3f}" for h in want]
    save_screenshot(page, tmp_path, "clipdex-results.png")

    page.fill("#q", "blue sky")  # typing a query puts it in the address
    page.press("#q", "Enter")
    page.wait_for_url("**/?q=blue+sky")
    want = local.search_query(Query.text("blue sky"), k=40)
    page.wait_for_function(FIRST_CARD_IS, arg=want[0].id)
    page.wait_for_function(THUMBS_LOADED, arg=12)
    assert shown_ids(page) == [h.id for h in want]

    chosen = want[2]
    page.click("#grid .card >> nth=2")
    page.wait_for_selector("#viewer:not([hidden])")
    page.wait_for_function(VIEWER_LOADED)
    assert page.text_content("#viewer-path") == chosen.path
    save_screenshot(page, tmp_path, "clipdex-viewer.png")

    page.click("#more-like")
    page.wait_for_url(f"**/?like={chosen.id}")
    similar = local.search_query(Query.image(chosen.path), k=40)
    page.wait_for_function(FIRST_CARD_IS, arg=similar[0].id)
    page.wait_for_function(THUMBS_LOADED, arg=12)
    assert shown_ids(page) == [h.id for h in similar] and chosen.id not in shown_ids(page)
    assert page.is_visible("#like-banner")
    save_screenshot(page, tmp_path, "clipdex-more-like-this.png")

    page.go_back()  # the address history is the search history
    page.wait_for_url("**/?q=blue+sky")
    page.wait_for_function(FIRST_CARD_IS, arg=want[0].id)
    assert page.input_value("#q") == "blue sky"


def test_scrolling_loads_the_next_pages(url, page, local, corpus):
    offsets: list[str] = []
    page.on("request", lambda r: "/api/search?" in r.url and offsets.append(r.url.split("offset=")[1]))
    page.set_viewport_size({"width": 900, "height": 500})
    page.goto(f"{url}/?q=a+photo&k=8")
    total = len(corpus["ids"])
    page.wait_for_function(SCROLLED_TO, arg=total)
    assert shown_ids(page) == [h.id for h in local.search_query(Query.text("a photo"), k=total)]
    assert [int(o.split("&")[0]) for o in offsets] == [0, 8, 16, 24]


def test_filters_change_the_address_and_the_results(url, page, local, corpus):
    page.goto(f"{url}/?q=red+circle")
    page.wait_for_selector("#grid .card")
    page.select_option("#f-type", "png")
    page.wait_for_url("**/?q=red+circle&type=png")
    want = local.search_query(Query.text("red circle"), k=40, filters=Filters(formats=parse_formats("png")))
    page.wait_for_function(CARDS, arg=len(want))
    assert shown_ids(page) == [h.id for h in want]

    folder = str(corpus["photos"] / "dups")
    page.fill("#f-folder", folder)
    page.press("#f-folder", "Enter")  # `change` fires on Enter
    page.wait_for_url("**folder=*")
    filters = Filters(folders=(folder,), formats=parse_formats("png"))
    want = local.search_query(Query.text("red circle"), k=40, filters=filters)
    page.wait_for_function(CARDS, arg=len(want))
    assert shown_ids(page) == [h.id for h in want]

    page.goto(f"{url}/?q=red+circle&type=png&folder={folder}")  # the same link, opened anew
    page.wait_for_function(CARDS, arg=len(want))
    assert page.input_value("#f-folder") == folder and page.input_value("#f-type") == "png"


def test_duplicates_view(url, page, local, tmp_path):
    page.goto(f"{url}/?view=duplicates&threshold=0.9")
    groups = local.duplicates(0.9)
    page.wait_for_function("(n) => document.querySelectorAll('#dups .group').length === n", arg=len(groups))
    members = page.eval_on_selector_all("#dups .group", GROUP_MEMBERS)
    assert members == [list(g.ids) for g in groups]
    page.wait_for_function(THUMBS_LOADED, arg=21)  # those in view
    save_screenshot(page, tmp_path, "clipdex-duplicates.png")


def test_a_token_given_once_authorises_the_page_and_its_thumbnails(served, tiny_clip_model, page, local):
    with LiveServer(create_app(served, token=TOKEN, model=tiny_clip_model)) as address:
        page.goto(f"{address}/?token={TOKEN}&q=red+circle")
        page.wait_for_url(f"{address}/?q=red+circle")  # the token left the address
        page.wait_for_function(THUMBS_LOADED, arg=8)  # <img> requests carry the session cookie
        assert shown_ids(page)[:5] == [h.id for h in local.search_query(Query.text("red circle"), k=5)]
        page.context.clear_cookies()
