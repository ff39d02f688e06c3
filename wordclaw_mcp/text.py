"""Text for channels: formats, length counted as each network counts it, and cuts that break
no character, word or link.

Every network counts a post its own way (``../shared/REFERENCE.md``): X weighs characters (most
Latin 1, CJK and emoji 2) after NFC normalisation and counts every URL as 23; Mastodon counts
grapheme clusters, every URL as 23 and a remote mention ``@user@domain`` as ``@user``; Bluesky
counts graphemes, up to 300, and also caps the UTF-8 bytes at 3,000. A ``Limit`` measures text by
one of those rules, and ``cut`` fits text to it on grapheme boundaries, at the end of a word and
never inside a URL.

The rules come from maintained libraries where one exists: twitter-text's (``twitter-text-parser``,
the port of the rules X publishes) for X's weights and URL detection, through ``entities``, which
finds the same URLs and emoji in linear time, and ``regex``'s ``\\X`` (Unicode extended grapheme
clusters) for graphemes. Every step here takes time linear in the text, so no input stalls the
server: ``cut`` measures only as much of a long text as can matter.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import markdownify
import regex
from bs4 import BeautifulSoup
from markdown_it import MarkdownIt
from twitter_text.regexp.latin_accent_chars import latin_accent_chars

from . import entities

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
    found = entities.extract_urls_with_indices(text, extract_urls_without_protocol=not schemes_only)
    return [(url["indices"][0], url["indices"][1], url["url"]) for url in found]


# --- Mastodon -------------------------------------------------------------------------------------
# Mastodon's StatusLengthValidator (app/validators/status_length_validator.rb) counts
# ``countable_text(status.text).each_grapheme_cluster.size``: every URL with a protocol
# (``Extractor.extract_urls_with_indices(str, extract_url_without_protocol: false)``) becomes 23
# x's and every mention ``@user@domain`` becomes ``@user``, after twitter-text's
# ``remove_overlapping_entities``; a blank status counts nothing.
# Mentions are Account::MENTION_RE (app/models/account.rb), where [[:word:]] is Onigmo's Letter,
# Mark, Decimal_Number and Connector_Punctuation, and USERNAME_RE is case-insensitive; Extractor
# (app/lib/extractor.rb) drops one followed by twitter-text's end_mention_match (an at sign, a
# Latin accented letter or "://") or whose domain is longer than 253 characters.
_WORD = r"\p{L}\p{M}\p{Nd}\p{Pc}"
_MENTION = regex.compile(
    rf"(?<![=/{_WORD}])@((?i:[a-z0-9_]+(?:[.-]+[a-z0-9_]+)*)(?:@[{_WORD}]+(?:[.-]+[{_WORD}]+)*)?)"
)
_MENTION_CUT_SHORT = regex.compile(f"[@＠{latin_accent_chars.pattern}]|://")
_MAX_MENTION_DOMAIN = 253
_BLANK = regex.compile(r"[[:space:]]*")


def mastodon_length(text: str) -> int:
    """A status's length as Mastodon counts it."""
    if _BLANK.fullmatch(text):
        return 0
    found = [(start, end, "x" * URL_LENGTH) for start, end, _ in urls(text)]
    if "@" in text:
        for mention in _MENTION.finditer(text):
            name = mention.group(1)
            _, _, domain = name.partition("@")
            if _MENTION_CUT_SHORT.match(text, mention.end()) or len(domain) > _MAX_MENTION_DOMAIN:
                continue
            found.append((mention.start(1) - 1, mention.end(1), "@" + name.split("@")[0]))
    parts, position = [], 0
    for start, end, replacement in sorted(found):
        if start < position:  # overlaps the entity kept before it
            continue
        parts += [text[position:start], replacement]
        position = end
    parts.append(text[position:])
    return _count_graphemes("".join(parts))


def _count_graphemes(text: str) -> int:
    return sum(1 for _ in _grapheme.finditer(text))


# How much of a long text is counted before deciding it cannot fit, and by how much that part's
# count may exceed the whole text's: a URL cut off at the end of the part (at most 4,096
# characters, twitter-text's longest) counted character by character, at weight 2 for X.
_PROBE = 32_768
_PROBE_SLACK = {"x": 2 * 4096 + 2, "mastodon": 4096 + 1, "bluesky": 1}


@dataclass(frozen=True)
class Limit:
    """How long a channel lets a post be, and how it counts: ``rule`` is ``x``, ``mastodon``,
    ``bluesky`` or ``characters`` (code points, for channels without a rule of their own)."""

    rule: str
    max_length: int
    max_bytes: int | None = None

    def length(self, text: str) -> int:
        if self.rule == "x":
            return entities.weighted_length(text)
        if self.rule == "mastodon":
            return mastodon_length(text)
        if self.rule == "bluesky":
            return _count_graphemes(text)
        return len(text)

    def fits(self, text: str) -> bool:
        if self.max_bytes is not None and len(text.encode()) > self.max_bytes:
            return False
        if self.rule != "characters" and len(text) > _PROBE:
            # A long text whose opening alone is too long is not counted to its end.
            if self.length(text[:_PROBE]) - _PROBE_SLACK[self.rule] > self.max_length:
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


_FIRST_WINDOW = 2048  # characters of a long text looked at first; each further look takes four times more


def cut(text: str, limit: Limit, *, suffix: str = "", ellipsis: str = ELLIPSIS) -> Cut:
    """``text`` and then ``suffix`` (a link to keep, say), cut so that the whole fits ``limit``.

    The cut falls at the end of a word, never inside a URL or a grapheme, and ``ellipsis``
    marks it. A first word too long to fit any way is cut between graphemes; a URL is never
    cut, it is left out whole. If not even ``suffix`` fits, ``DoesNotFit``.

    Only the opening of a long text that can matter is measured: counts only grow from one
    word's end to the next, so the cut lies before the first end of a word at which the text
    alone no longer fits (``_reach``).
    """
    reach, words_end = _reach(text, limit)
    whole = text + suffix
    if reach == len(text) and limit.fits(whole):
        return Cut(whole, limit.length(whole), limit.max_length, False)
    if not limit.fits(ellipsis + suffix):
        raise DoesNotFit(f"the limit of {limit.max_length} leaves no room for {_quoted(suffix.strip())}")
    window = text[:reach]

    def fits_at(end: int) -> bool:
        return limit.fits(window[:end].rstrip() + ellipsis + suffix)

    # Ends of words: just before a run of spaces (never inside a URL, which has no spaces).
    ends = [m.start() for m in _space.finditer(window, 0, words_end) if m.start() > 0]
    best = _longest(ends, fits_at)
    if best is None:
        best = _longest_inside_word(window, fits_at)
    result = window[:best].rstrip() + ellipsis + suffix
    return Cut(result, limit.length(result), limit.max_length, True, best)


def _reach(text: str, limit: Limit) -> tuple[int, int]:
    """Where the part of ``text`` that a cut can keep ends: the end of the text, or an end of a
    word (looked for in windows that grow fourfold) at which the text alone is over the limit;
    and where the last space before it may lie."""
    size = _FIRST_WINDOW
    while size < len(text):
        space = _space.search(text, size)
        if space is None:
            return len(text), size
        if not limit.fits(text[: space.start()]):
            return space.start(), space.start()
        size = 4 * space.start()
    return len(text), len(text)


def _longest_inside_word(window: str, fits_at: Any) -> int:
    """The longest cut between graphemes, outside any URL, that fits (0 if none does), looked
    for in openings of ``window`` that grow fourfold until one holds a cut that does not fit."""
    size = _FIRST_WINDOW
    while True:
        part = window[:size]
        linked = urls(part, schemes_only=False)
        starts = [start for start, _, _ in linked]
        boundaries = []
        for cluster in _grapheme.finditer(part):
            end = cluster.end()
            index = bisect.bisect_left(starts, end) - 1
            if index < 0 or linked[index][1] <= end:  # not inside the URL that starts before it
                boundaries.append(end)
        best = _longest(boundaries, fits_at)
        if len(part) == len(window) or (best is not None and best != boundaries[-1]):
            return best or 0
        size *= 4


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
# Converting is the one step whose time is not linear in a small constant: markdown-it-py and
# BeautifulSoup are pure Python, and a million characters of dense markup take them seconds. So a
# caller (the service, for one tool call) sets a time limit, and a conversion still running then
# stops with ``TooComplex``; HTML also may not nest deeper than markdownify can recurse. A plan
# converts the same body for several channels: the last two results of each conversion are kept.

MAX_HTML_DEPTH = 100  # elements inside one another, well above real pages and below Python's recursion limit

_deadline: ContextVar[float | None] = ContextVar("conversion_deadline", default=None)


class TooComplex(ValueError):
    """Text that nests too deep, or takes too long, to convert."""


@contextmanager
def deadline(at: float) -> Iterator[None]:
    """Conversions begun inside may run until ``at`` (``time.monotonic()``), then raise ``TooComplex``."""
    token = _deadline.set(at)
    try:
        yield
    finally:
        _deadline.reset(token)


# Under a deadline a conversion runs in a worker thread (the service's). Every half millisecond
# it lets go of the GIL, so the event loop's thread, which needs it at every wake-up of a
# request, waits that long at most rather than Python's switch interval (5 ms) each time.
_LET_GO_SECONDS = 0.0005
_let_go_at = 0.0


def _on_time() -> None:
    global _let_go_at
    deadline = _deadline.get()
    if deadline is None:
        return
    now = time.monotonic()
    if now > deadline:
        raise TooComplex("converting it takes longer than this call may take")
    if now >= _let_go_at:
        _let_go_at = now + _LET_GO_SECONDS
        time.sleep(0)


def _inline_on_time(state: Any, silent: bool) -> bool:
    _on_time()
    return False  # the other rules go on


def _block_on_time(state: Any, start_line: int, end_line: int, silent: bool) -> bool:
    _on_time()
    return False


_markdown.inline.ruler.before("text", "on_time", _inline_on_time)
# Also among the rules a paragraph, list or quote asks at each of its lines whether it ends.
_markdown.block.ruler.before(
    "table", "on_time", _block_on_time, {"alt": ["paragraph", "reference", "blockquote", "list"]}
)


@lru_cache(maxsize=2)
def markdown_to_html(markdown: str) -> str:
    """CommonMark to HTML, with raw HTML escaped and unsafe links (javascript: and the like) dropped."""
    return _markdown.render(markdown)


class _Soup(BeautifulSoup):
    """BeautifulSoup that refuses elements nested deeper than ``MAX_HTML_DEPTH`` as it parses."""

    def handle_starttag(self, *args: Any, **kwargs: Any) -> Any:
        _on_time()
        if len(self.tagStack) > MAX_HTML_DEPTH:
            raise TooComplex(f"its elements are nested more than {MAX_HTML_DEPTH} deep")
        return super().handle_starttag(*args, **kwargs)

    def handle_data(self, data: str) -> None:
        _on_time()
        super().handle_data(data)


class _Converter(markdownify.MarkdownConverter):
    def process_element(self, node: Any, parent_tags: Any = None) -> Any:
        _on_time()
        return super().process_element(node, parent_tags)


@lru_cache(maxsize=2)
def html_to_markdown(html: str) -> str:
    """HTML (an item whose body arrives as HTML) to Markdown; scripts and styles are dropped."""
    try:
        return _Converter(heading_style="ATX").convert_soup(_Soup(html, "html.parser")).strip()
    except RecursionError:  # a structure deep in some other way than nesting elements
        raise TooComplex("its structure is too deep to convert") from None


@lru_cache(maxsize=2)
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
    byte_start, position = 0, 0  # counted on from the last URL: linear however many there are
    for start, end, url in urls(text):
        byte_start += len(text[position:start].encode())
        position = start
        facets.append(
            {
                "index": {"byteStart": byte_start, "byteEnd": byte_start + len(text[start:end].encode())},
                "features": [{"$type": "app.bsky.richtext.facet#link", "uri": url}],
            }
        )
    return facets


def attribution_line(metadata: dict[str, Any]) -> str | None:
    """ "By <author> · <license>", from an item's metadata, as far as it has them."""
    author, license_ = metadata.get("author"), metadata.get("license")
    parts = [f"By {author}" if author else None, str(license_) if license_ else None]
    return " · ".join(part for part in parts if part) or None


def _quoted(kept: str, most: int = 120) -> str:
    """``kept`` quoted for an error message, its middle left out past ``most`` characters: an
    error should say what did not fit, not hand the agent back a megabyte."""
    if len(kept) <= most:
        return repr(kept)
    return f"{kept[: most // 2]!r} … {kept[-most // 2 :]!r} ({len(kept):,} characters)"

