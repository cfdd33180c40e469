"""Great Expectations Data Docs that render offline (an air-gapped cluster, a laptop on a plane).

GX writes pages that load bootstrap, jquery, bootstrap-table, font-awesome, ... from CDNs and its logo from
S3. :func:`make_offline` copies the same releases, bundled in ``data_docs_assets/`` (see its
``LICENSES.txt``), to ``static/vendor/`` of the docs site and points every page at them with relative
paths. What is not bundled (vega, used by no expectation of the suite; the dark-mode theme) is dropped, a
remote image becomes GX's own local logo, any other remote asset is removed, and links into ``static/`` are
made relative to each page (GX's favicon link is one ``..`` short on validation pages), so opening the pages
makes no request beyond ``file://``. Links (``<a href>``) stay: they are only followed when clicked.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["ASSETS", "make_offline", "remote_assets"]

ASSETS = Path(__file__).with_name("data_docs_assets")
VENDOR = Path("static") / "vendor"
LOGO = Path("static") / "images" / "logo-long.png"  # shipped by GX in every site's static/

# the file name in a CDN URL -> the bundled file (names not listed map to themselves when bundled)
_ALIASES = {
    "jquery-3.7.1.min.js": "jquery.min.js",
    "all.min.css": "fontawesome.min.css",
    "bootstrap-table-filter-control.css": "bootstrap-table-filter-control.min.css",
}
_REMOTE = r"(?:https?:)?//[^\"'\s)]+"
# a tag that makes the browser fetch something: <link href>, <script src></script>, <img src>
_TAG = re.compile(r"<(link|script|img)\b[^>]*?\b(?:href|src)\s*=\s*([\"'])(" + _REMOTE + r")\2[^>]*>"
                  r"(?:\s*</script>)?", re.I | re.S)
_CSS_URL = re.compile(r"url\(\s*([\"']?)(" + _REMOTE + r")\1\s*\)", re.I)
_STATIC = re.compile(r"(\b(?:href|src)\s*=\s*[\"'])((?:\./|\.\./)*)(static/[^\"']+)", re.I)  # GX's own, some one .. short
_SRI = re.compile(r"\s(?:integrity|crossorigin)\s*=\s*([\"']).*?\1", re.I | re.S)


def _bundled(url: str) -> str | None:
    """The bundled file a CDN URL stands for, or None."""
    name = Path(urlparse(url if not url.startswith("//") else "https:" + url).path).name
    name = _ALIASES.get(name, name)
    return name if name and (ASSETS / name).is_file() else None


def _is_logo(url: str) -> bool:
    return "great-expectations-web-assets" in url and url.split("?")[0].endswith(".png")


def _rel(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target, page.parent)).as_posix()


def _rewrite_css_urls(text: str, page: Path, site: Path) -> str:
    def repl(m: re.Match) -> str:
        return f"url('{_rel(site / LOGO, page)}')" if _is_logo(m.group(2)) else "none"
    return _CSS_URL.sub(repl, text)


def _rewrite_page(text: str, page: Path, site: Path) -> str:
    def repl(m: re.Match) -> str:
        tag, url = m.group(1).lower(), m.group(3)
        if tag == "img":
            return m.group(0).replace(url, _rel(site / LOGO, page)) if _is_logo(url) else ""
        local = _bundled(url)
        if local is None:
            return ""
        return _SRI.sub("", m.group(0).replace(url, _rel(site / VENDOR / local, page)))
    text = _STATIC.sub(lambda m: m.group(1) + _rel(site / m.group(3), page), _TAG.sub(repl, text))
    return _rewrite_css_urls(text, page, site)


def make_offline(site: str | Path) -> None:
    """Make the Data Docs site under ``site`` self-contained (in place; idempotent)."""
    site = Path(site)
    shutil.copytree(ASSETS, site / VENDOR, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    for page in [*site.rglob("*.html"), *(site / "static").rglob("*.css")]:
        if VENDOR in page.relative_to(site).parents:
            continue
        text = page.read_text(encoding="utf-8")
        new = (_rewrite_page if page.suffix == ".html" else _rewrite_css_urls)(text, page, site)
        if new != text:
            page.write_text(new, encoding="utf-8")


def remote_assets(site: str | Path) -> list[str]:
    """Every remote URL a page or stylesheet of ``site`` would fetch on load (empty once offline)."""
    found = []
    site = Path(site)
    for page in [*site.rglob("*.html"), *site.rglob("*.css")]:
        text = page.read_text(encoding="utf-8")
        found += [f"{page.relative_to(site)}: {m.group(3)}" for m in _TAG.finditer(text)]
        found += [f"{page.relative_to(site)}: {m.group(2)}" for m in _CSS_URL.finditer(text)]
    return found
