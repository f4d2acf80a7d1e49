"""A rendered page parsed back with the standard library, and its Bokeh document decoded.

``parse(html)`` gives a small element tree (tag, attrs, children, text) to query the way a
browser would see the markup; ``bokeh_models(html)`` decodes the embedded Bokeh document
(HTML-escaped JSON, gzip+base64 arrays) into ``{model name: attributes}``.
"""
from __future__ import annotations

import base64
import gzip
import html
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Iterator

import numpy as np

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    children: list["Element | str"] = field(default_factory=list)

    def iter(self) -> Iterator["Element"]:
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list["Element"]:
        return [e for e in self.iter() if (tag is None or e.tag == tag)
                and all(e.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())]

    def find(self, tag: str | None = None, **attrs: str) -> "Element":
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def with_class(self, name: str) -> list["Element"]:
        return [e for e in self.iter() if name in e.classes()]

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        el = Element(tag, dict(attrs))
        self.stack[-1].children.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> Element:
    builder = _Builder()
    builder.feed(page)
    builder.close()
    return builder.root


def bokeh_document(page: str) -> dict[str, Any]:
    """The Bokeh document JSON that ``bokeh.embed.components`` wrote into the page."""
    match = re.search(r"const docs_json = '(.*?)';", page, re.S)
    assert match, "no Bokeh document in the page"
    literal = match.group(1).replace("\\\\", "\\")
    return json.loads(html.unescape(literal))


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "ndarray":
        raw = base64.b64decode(value["array"]["data"])
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return np.frombuffer(raw, dtype=value["dtype"]).reshape(value["shape"])
    if isinstance(value, dict) and value.get("type") == "map":
        return {k: _decode(v) for k, v in value.get("entries", [])}
    if isinstance(value, dict) and value.get("type") == "object" and isinstance(value.get("attributes"), dict):
        return {"type": value.get("name"), **{k: _decode(v) for k, v in value["attributes"].items()}}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def bokeh_models(page: str) -> dict[str, dict[str, Any]]:
    """Every named model of the page's Bokeh document: name -> decoded attributes (with type)."""
    out: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            attrs = node.get("attributes")
            if node.get("type") == "object" and isinstance(attrs, dict) and isinstance(attrs.get("name"), str):
                out[attrs["name"]] = {"type": node.get("name"), **{k: _decode(v) for k, v in attrs.items()}}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(bokeh_document(page))
    return out
