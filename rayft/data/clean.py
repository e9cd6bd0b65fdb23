"""Text cleaning and the keys that deduplication and splitting hash.

Each step is configurable (``data.clean``); the keys are stable across runs, machines and
Python versions (BLAKE2b, never Python's salted ``hash``)."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from html.parser import HTMLParser

from rayft.config import CleanConfig

_WHITESPACE = re.compile(r"\s+")
# C0/C1 control characters except tab and newline (whitespace collapse handles those).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Zero-width and directional marks that survive normalization and defeat deduplication.
_INVISIBLE = re.compile(r"[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TAG_HINT = re.compile(r"<[a-zA-Z!/]")


class _TextExtractor(HTMLParser):
    """Keeps the text of an HTML fragment, drops tags, scripts and styles."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    if not _TAG_HINT.search(text):
        return html.unescape(text) if "&" in text else text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def clean_text(text: str, clean: CleanConfig) -> tuple[str, list[str]]:
    """Apply the configured cleaning steps, in a fixed order; also return the names of
    the steps that changed the text (counted in the data report)."""
    changed = []

    def step(name: str, result: str) -> str:
        if result != text:
            changed.append(name)
        return result

    if clean.strip_html:
        text = step("strip_html", strip_html(text))
    if clean.unicode:
        text = step("unicode", unicodedata.normalize(clean.unicode, text))
    if clean.remove_control:
        text = step("remove_control", _INVISIBLE.sub("", _CONTROL.sub(" ", text)))
    if clean.collapse_whitespace:
        text = step("collapse_whitespace", _WHITESPACE.sub(" ", text).strip())
    return text, changed


def dedup_text(text: str) -> str:
    """What two rows must share to count as duplicates: case and spacing ignored."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def stable_hash(text: str) -> int:
    """A 63-bit hash, identical on every machine and run."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def split_of(key_text: str, fractions: dict[str, float], salt: str = "") -> str:
    """Deterministic split assignment by hash: the same text lands in the same split on
    every machine and run, and exact duplicates always share a split."""
    point = stable_hash(salt + key_text) / float(1 << 63)
    cumulative = 0.0
    last = next(reversed(fractions))
    for name, fraction in fractions.items():
        cumulative += fraction
        if point < cumulative:
            return name
    return last
