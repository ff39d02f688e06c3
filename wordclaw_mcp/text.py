"""Text for channels: formats, length counted as each network counts it, and cuts that break
no character, word or link.

Every network counts a post its own way (``../shared/REFERENCE.md``): X weighs characters (most
Latin 1, CJK and emoji 2) after NFC normalisation and counts every URL as 23; Mastodon counts characters, every URL as
23; Bluesky counts graphemes, up to 300, and also caps the UTF-8 bytes at 3,000. A ``Limit``
measures text by one of those rules, and ``cut`` fits text to it on grapheme boundaries, at the
end of a word and never inside a URL.

The rules come from maintained libraries where one exists: ``twitter-text-parser`` (the port of
twitter-text, whose rules X publishes) for X's weights and URL detection, and ``regex``'s ``\\X``
(Unicode extended grapheme clusters) for graphemes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import markdownify
import regex
from markdown_it import MarkdownIt
from twitter_text import parse_tweet
from twitter_text.extract_urls import extract_urls_with_indices

URL_LENGTH = 23  # what X and Mastodon count a URL as, whatever its length
ELLIPSIS = "…"

# html=False: raw HTML in an item is escaped, not passed through. Links markdown-it refuses
# (javascript:, vbscript:, file: and most data:) are left as text, not made links.
_markdown = MarkdownIt("commonmark", {"html": False})
_grapheme = regex.compile(r"\X")
_space = regex.compile(r"\s+")
# A blank line: a line end, then lines holding nothing but whitespace, each with its line end.
# Line ends are \n, \r\n or \r, matched atomically so that \r\n is never taken for two.
_blank_lines = regex.compile(r"(?>\r\n|\r|\n)(?:[^\S\r\n]*+(?>\r\n|\r|\n))+")


def first_paragraph(text: str) -> str:
    """``text`` up to its first blank line, whatever its line ends and whatever spaces or tabs the
    blank line holds: the opening an excerpt is made from."""
    return _blank_lines.split(text.strip(), maxsplit=1)[0]


def graphemes(text: str) -> list[str]:
    """``text`` split into user-perceived characters (extended grapheme clusters)."""
    return _grapheme.findall(text)


def urls(text: str, *, schemes_only: bool = True) -> list[tuple[int, int, str]]:
    """The URLs in ``text`` as (start, end, url), by twitter-text's rules.

    ``schemes_only`` keeps those written with http:// or https://; X also counts bare domains
    (``example.com``) as links, Mastodon and Bluesky do not.
    """
    found = [(u["indices"][0], u["indices"][1], u["url"]) for u in extract_urls_with_indices(text)]
    if schemes_only:
        found = [u for u in found if u[2].lower().startswith(("http://", "https://"))]
    return found


@dataclass(frozen=True)
class Limit:
    """How long a channel lets a post be, and how it counts: ``rule`` is ``x``, ``mastodon``,
    ``bluesky`` or ``characters`` (code points, for channels without a rule of their own)."""

    rule: str
    max_length: int
    max_bytes: int | None = None

    def length(self, text: str) -> int:
        if self.rule == "x":
            return parse_tweet(text).weightedLength
        if self.rule == "mastodon":
            spans = urls(text)
            linked = sum(end - start for start, end, _ in spans)
            return len(text) - linked + URL_LENGTH * len(spans)
        if self.rule == "bluesky":
            return len(graphemes(text))
        return len(text)

    def fits(self, text: str) -> bool:
        if self.max_bytes is not None and len(text.encode()) > self.max_bytes:
            return False
        return self.length(text) <= self.max_length


RULES = {"x", "mastodon", "bluesky", "characters"}


def limit_for(rule: str, max_length: int | None = None) -> Limit:
    """The limit of a rule: X 280, Mastodon 500 (an instance may allow more), Bluesky 300 and
    3,000 bytes; ``max_length`` overrides the length (a policy's, or an instance's own)."""
    defaults = {"x": (280, None), "mastodon": (500, None), "bluesky": (300, 3000), "characters": (None, None)}
    if rule not in defaults:
        raise ValueError(f"unknown counting rule {rule!r}; use one of {sorted(RULES)}")
    length, max_bytes = defaults[rule]
    if max_length is None and length is None:
        raise ValueError("the characters rule needs a max_length")
    return Limit(rule, max_length if max_length is not None else length, max_bytes)


class DoesNotFit(ValueError):
    """What must be kept whole (a link, hashtags) is longer than the limit by itself."""


@dataclass(frozen=True)
class Cut:
    """Text fitted to a limit, and what a dry run shows of it."""

    text: str
    length: int  # counted by the limit's rule
    limit: int
    truncated: bool
    cut_at: int | None = None  # where in the original text it was cut (code points), when it was


def cut(text: str, limit: Limit, *, suffix: str = "", ellipsis: str = ELLIPSIS) -> Cut:
    """``text`` and then ``suffix`` (a link to keep, say), cut so that the whole fits ``limit``.

    The cut falls at the end of a word, never inside a URL or a grapheme, and ``ellipsis``
    marks it. A first word too long to fit any way is cut between graphemes; a URL is never
    cut, it is left out whole. If not even ``suffix`` fits, ``DoesNotFit``.
    """
    whole = text + suffix
    if limit.fits(whole):
        return Cut(whole, limit.length(whole), limit.max_length, False)
    if not limit.fits(ellipsis + suffix):
        raise DoesNotFit(f"the limit of {limit.max_length} leaves no room for {suffix.strip()!r}")

    def attempt(end: int) -> str:
        return text[:end].rstrip() + ellipsis + suffix

    linked = urls(text, schemes_only=False)
    inside_url = {i for start, end, _ in linked for i in range(start + 1, end)}
    # Ends of words: just before a run of spaces, outside any URL.
    ends = [m.start() for m in _space.finditer(text) if m.start() > 0 and m.start() not in inside_url]
    best = _longest(ends, lambda end: limit.fits(attempt(end)))
    if best is None:
        # No whole first word fits: cut it between graphemes, but never inside a URL.
        boundaries, position = [], 0
        for cluster in graphemes(text):
            position += len(cluster)
            if position not in inside_url:
                boundaries.append(position)
        best = _longest(boundaries, lambda end: limit.fits(attempt(end))) or 0
    result = attempt(best)
    return Cut(result, limit.length(result), limit.max_length, True, best)


def _longest(candidates: list[int], fits: Any) -> int | None:
    """The largest candidate that fits, by binary search: a longer start never counts less."""
    low, high, best = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            best, low = candidates[middle], middle + 1
        else:
            high = middle - 1
    return best


# --- formats ----------------------------------------------------------------------------------


def markdown_to_html(markdown: str) -> str:
    """CommonMark to HTML, with raw HTML escaped and unsafe links (javascript: and the like) dropped."""
    return _markdown.render(markdown)


def html_to_markdown(html: str) -> str:
    """HTML (an item whose body arrives as HTML) to Markdown; scripts and styles are dropped."""
    return markdownify.markdownify(html, heading_style="ATX").strip()


def markdown_to_text(markdown: str) -> str:
    """Plain text that keeps link targets: ``[label](url)`` becomes ``label (url)``."""
    blocks: list[str] = []
    for token in _markdown.parse(markdown):
        if token.type == "inline":
            blocks.append(_inline_text(token.children or []))
        elif token.type in {"fence", "code_block"}:
            blocks.append(token.content.rstrip("\n"))
        elif token.type == "list_item_open":
            blocks.append("- ")
    lines: list[str] = []
    for block in blocks:
        if lines and lines[-1] == "- ":
            lines[-1] += block
        else:
            lines.append(block)
    return "\n\n".join(line for line in lines if line.strip())


def _inline_text(children: list[Any]) -> str:
    parts: list[str] = []
    hrefs: list[tuple[str, int]] = []
    for child in children:
        if child.type in {"text", "code_inline"}:
            parts.append(child.content)
        elif child.type in {"softbreak", "hardbreak"}:
            parts.append("\n")
        elif child.type == "link_open":
            hrefs.append((str(child.attrs.get("href", "")), len(parts)))
        elif child.type == "link_close" and hrefs:
            href, start = hrefs.pop()
            label = "".join(parts[start:])
            if href and label not in _addresses_as_written(href):
                parts.append(f" ({href})")
        elif child.type == "image":
            parts.append(child.content or "")
    return "".join(parts)


def _addresses_as_written(href: str) -> set[str]:
    """The ways a link's label may write its own address: an autolink's label is the address
    before markdown-it percent-encoded it, and a mail address's lacks ``mailto:``. A label that is
    its address is not followed by it again."""
    written = _markdown.normalizeLinkText(href)
    return {href, written, written.removeprefix("mailto:")}


def link_facets(text: str) -> list[dict[str, Any]]:
    """Bluesky's link facets for the http(s) URLs in ``text``: ranges in UTF-8 bytes, as the AT
    Protocol counts them, not in characters."""
    facets = []
    for start, end, url in urls(text):
        byte_start = len(text[:start].encode())
        facets.append(
            {
                "index": {"byteStart": byte_start, "byteEnd": byte_start + len(text[start:end].encode())},
                "features": [{"$type": "app.bsky.richtext.facet#link", "uri": url}],
            }
        )
    return facets
