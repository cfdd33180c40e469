"""Data Docs render offline: the pages ``eupe data validate`` writes load their CSS, JavaScript, fonts and
images from the docs folder itself, never from a CDN (issue 14, item 2).

The browser test opens ``data_docs/index.html`` in Debian's headless chromium (Playwright; never
``playwright install``), clicks the run in the index table (drawn by bootstrap-table, so jquery and the
plugins ran) to reach the validation-result page, records every request of both pages and asserts that
each is ``file://``: anything else is also aborted, so a regression cannot hide behind a working network.
Styled means bootstrap's CSS applies (the navbar is a flexbox, the body uses bootstrap's font stack), the
font-awesome status icons have their font, and the expectation table shows the suite's checks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from eupe.cli import main
from eupe.data.data_docs import ASSETS, make_offline, remote_assets
from eupe.data.synth import synthesize

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `.ci/run` installs it. Never `playwright install`.


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Data Docs of a run with one image below validation.min_side: a failed gate (exit 2), docs written."""
    root = tmp_path_factory.mktemp("docs")
    synthesize(root / "data", 12, size=(64, 96), seed=3, num_classes=2)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "data" / "tiny.png")
    code = main(["data", "validate", "--data", str(root / "data"), "--out", str(root / "val"), "--workers", "1",
                 "--set", "validation.min_side=32", "--set", "validation.outlier_z=1000"])
    assert code == 2  # min_side failed; Data Docs are written before the gate fails
    return root / "val" / "data_docs"


def test_no_page_or_stylesheet_references_a_remote_asset(docs):
    assert remote_assets(docs) == []
    vendor = docs / "static" / "vendor"
    assert {p.name for p in ASSETS.glob("*.*")} - {"LICENSES.txt"} <= {p.name for p in vendor.iterdir()}
    pages = list(docs.rglob("*.html"))
    assert len(pages) >= 3  # index, the suite, one validation result
    for page in pages:
        text = page.read_text()
        assert "cdn" not in text.lower() or not re.search(r"(src|href)=[\"']https?://[^\"']*cdn", text)
        for ref in re.findall(r"<(?:link|script)\b[^>]*(?:href|src)=[\"']([^\"']+)[\"']", text):
            assert (page.parent / ref).resolve().is_file(), f"{page.name}: {ref} is not in the docs folder"


def test_make_offline_rewrites_cdn_links_and_drops_what_is_not_bundled(tmp_path):
    page = tmp_path / "validations" / "run" / "page.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        '<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css" '
        'integrity="sha384-x" crossorigin="anonymous"/>\n'
        '<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>\n'
        '<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>\n'
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">\n'
        '<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1">\n'
        "<style>.x { background: url('https://example.com/a.png') }</style>\n"
        '<a href="https://greatexpectations.io">a link is not a request</a>\n')
    make_offline(tmp_path)
    assert page.read_text() == (
        '<link rel="stylesheet" href="../../static/vendor/bootstrap.min.css"/>\n'
        '<script src="../../static/vendor/jquery.min.js"></script>\n\n\n'
        '<img src="../../static/images/logo-long.png">\n'
        "<style>.x { background: none }</style>\n"
        '<a href="https://greatexpectations.io">a link is not a request</a>\n')
    assert (tmp_path / "static" / "vendor" / "webfonts" / "fa-solid-900.woff2").is_file()
    make_offline(tmp_path)  # idempotent
    assert remote_assets(tmp_path) == []


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_pages_render_styled_in_headless_chromium_with_no_request_leaving_the_machine(docs):
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context()
            context.route(re.compile(r"^(?!file:)"), lambda route: route.abort())  # nothing leaves, even if asked
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto((docs / "index.html").as_uri(), wait_until="load")
            _assert_styled(page)
            row = page.locator(".bootstrap-table table tbody tr").first  # drawn by bootstrap-table (jquery)
            row.wait_for(state="visible", timeout=15_000)
            with page.expect_navigation(wait_until="load"):
                row.click()
            assert "/validations/" in page.url and page.url.startswith("file://")
            _assert_styled(page)
            assert page.get_by_text("short_side", exact=True).first.is_visible()  # a column's section
            assert page.locator("th", has_text="Observed Value").first.is_visible()  # its expectation table
            assert page.locator("td", has_text="min_side (fail)").first.is_visible()
            assert page.evaluate("document.fonts.check('900 16px \"Font Awesome 6 Free\"')")
        finally:
            browser.close()
    remote = [u for u in requests if not u.startswith(("file://", "data:", "about:"))]
    assert remote == [], f"requests left the machine: {remote}"
    assert any(u.endswith("static/vendor/bootstrap.min.css") for u in requests)
    assert errors == [], f"JavaScript errors: {errors}"


def _assert_styled(page) -> None:
    """Bootstrap's CSS applies (unstyled, a <nav> is a block and the body a serif font) and icons draw."""
    page.wait_for_load_state("load")
    nav = page.locator("nav.navbar").first
    assert nav.evaluate("e => getComputedStyle(e).display") == "flex"
    assert "apple-system" in page.evaluate("getComputedStyle(document.body).fontFamily")
    icon = page.locator("i.fas:visible").first
    icon.wait_for(state="visible", timeout=15_000)
    assert "Font Awesome" in icon.evaluate("e => getComputedStyle(e).fontFamily + getComputedStyle(e, '::before').fontFamily")
