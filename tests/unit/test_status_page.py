"""The HTML status page: well-formed, self-contained, and it never pastes data as markup."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from replica_router._status_page import status_page

VOID = {"meta", "br", "wbr", "hr", "img", "input", "link"}


class Page(HTMLParser):
    """Every element with its attributes; fails on a tag closed out of order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.doctype = ""
        self.scripts: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1] == "script":
            self.scripts.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert page.open == []
    return page


def test_the_page_is_one_well_formed_html_document() -> None:
    page = parse(status_page("/health/nodes"))
    assert page.doctype.lower() == "doctype html"
    tags = [tag for tag, _ in page.elements]
    assert tags[0] == "html"
    for tag in ("head", "title", "style", "body", "script"):
        assert tags.count(tag) == 1
    for table in ("nodes", "reads"):
        assert ("table", {"id": table}) in page.elements


@pytest.mark.parametrize("path", ["/health/nodes", "nodes", "../status/nodes.json"])
def test_the_page_fetches_the_data_path(path: str) -> None:
    text = status_page(path)
    assert path in text
    (body,) = [attrs for tag, attrs in parse(text).elements if tag == "body"]
    assert body["data-source"] == path


def test_nothing_comes_from_another_origin() -> None:
    text = status_page("/health/nodes")
    page = parse(text)
    for tag, attrs in page.elements:
        for name in ("src", "href", "action"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:)?//", value), f"<{tag} {name}={value!r}>"
    assert "http://" not in text and "https://" not in text
    (policy,) = [
        attrs["content"]
        for tag, attrs in page.elements
        if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy"
    ]
    assert policy is not None
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_data_is_only_ever_text() -> None:
    (script,) = parse(status_page("nodes")).scripts
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "textContent" in script


def test_the_data_path_cannot_break_out_of_its_attribute() -> None:
    path = '/health/nodes?x="><script>alert(1)</script>'
    page = parse(status_page(path))
    (body,) = [attrs for tag, attrs in page.elements if tag == "body"]
    assert body["data-source"] == path
    assert [tag for tag, _ in page.elements].count("script") == 1


@pytest.mark.parametrize(
    "path",
    [
        "",
        "  ",
        "https://example.com/nodes",
        "//example.com/nodes",
        " //example.com/nodes",
        "\\\\example.com/nodes",
        "/\\example.com/nodes",
        "/\t/example.com/nodes",
        "javascript:alert(1)",
    ],
)
def test_the_data_path_stays_on_the_page_origin(path: str) -> None:
    with pytest.raises(ValueError, match="data_path"):
        status_page(path)
