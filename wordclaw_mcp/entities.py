"""URLs and emoji found as twitter-text finds them, in time linear in the text.

twitter-text's Python port (``twitter-text-parser``) finds URLs with one regular expression whose
domain part, ``valid_subdomain* valid_domain_name tld``, backtracks through a whole chain of
labels from every place a URL could start: on ``"a." * n`` that is n/2 starts of n/2 labels each,
and a 3,000-character body took a minute (``../shared/REFERENCE.md``). Its emoji expression tries
some two thousand alternatives at every character (21 s for a million characters). ``parse_tweet``
calls both.

This module gives the same answers without the repeated work. The expression's parts after the
domain are all optional and end the pattern, so once a domain matches, the rest is a single
forward match; and which domain matches from a start depends only on the maximal run of label
characters the start lies in. So every run is settled once, from the right (``_Domains``), and
the search for matches (``_url_matches``) visits each run and each ``http(s)://`` once. Only the
pieces that cannot backtrack far (the port, path and query, a top-level domain at one place) are
left to the port's own expressions, compiled with the flags twitter-text compiles them with.
``tests/test_text.py`` checks the results against twitter-text's own functions.
"""

from __future__ import annotations

import _sre
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from re import _casefix  # type: ignore[attr-defined]  # the letters re's IGNORECASE also matches

from twitter_text.config import config as _twitter_config
from twitter_text.extract_urls import default_protocol, idna_to_ascii, max_tco_slug_length, max_url_length
from twitter_text.regex_supplant import regex_supplant
from twitter_text.regexp.directional_markers_group import directional_markers_group
from twitter_text.regexp.emoji import emoji_list, single_codepoint_emoji_ranges
from twitter_text.regexp.invalid_chars_group import invalid_chars_group
from twitter_text.regexp.invalid_domain_chars import invalid_domain_chars as _invalid_domain_chars
from twitter_text.regexp.invalid_url_without_protocol_preceding_chars import (
    invalid_url_without_protocol_preceding_chars,
)
from twitter_text.regexp.latin_accent_chars import latin_accent_chars
from twitter_text.regexp.valid_cctld import valid_cctld
from twitter_text.regexp.valid_gtld import valid_gtld
from twitter_text.regexp.valid_port_number import valid_port_number
from twitter_text.regexp.valid_punycode import valid_punycode
from twitter_text.regexp.valid_tco_url import valid_tco_url
from twitter_text.regexp.valid_url_path import valid_url_path
from twitter_text.regexp.valid_url_query_chars import valid_url_query_chars
from twitter_text.regexp.valid_url_query_ending_chars import valid_url_query_ending_chars

_I = re.IGNORECASE  # extract_url is compiled with it, and so every part inlined into it
invalid_domain_chars = _invalid_domain_chars.pattern

# A domain's label characters, and the runs of them (with "_" and "-") that labels are cut from.
_DOMAIN_CHAR = re.compile(f"[^{invalid_domain_chars}]", _I)
_LABEL = f"(?:[^{invalid_domain_chars}]|[_-])"
# A maximal run whose last character is a label character, followed by a dot. The lookbehind
# starts it only where a run starts, and the run gives back at most its length once, so the
# search is linear.
_DOTTED_RUN = re.compile(f"(?<!{_LABEL}){_LABEL}*[^{invalid_domain_chars}]\\.", _I)
# What may precede a URL (valid_url_preceding_chars less its "^"), and a label character after it.
_PRECEDING = f"[^A-Za-z0-9@＠$#＃{invalid_chars_group}]|[{directional_markers_group}]"
_PRECEDING_CHAR = re.compile(_PRECEDING, _I)
_URL_START = re.compile(f"(?<={_PRECEDING})[^{invalid_domain_chars}]", _I)
_PROTOCOL = re.compile(r"https?:\/\/", _I)
# Everything after the domain (port, path, query): optional parts at the end of the pattern.
_AFTER_DOMAIN = regex_supplant(
    "(?::(#{valid_port_number}))?(\\/#{valid_url_path}*)?(\\?#{valid_url_query_chars}*#{valid_url_query_ending_chars})?",
    {
        "valid_port_number": valid_port_number,
        "valid_url_path": valid_url_path,
        "valid_url_query_chars": valid_url_query_chars,
        "valid_url_query_ending_chars": valid_url_query_ending_chars,
    },
    _I,
)
# valid_ascii_domain's labels, for the bare domains found inside a domain without a protocol.
_ASCII_LABEL = f"[\\-a-z0-9{latin_accent_chars.pattern}]"
_DOTTED_ASCII_RUN = re.compile(f"(?<!{_ASCII_LABEL}){_ASCII_LABEL}++\\.", _I)

# --- top-level domains --------------------------------------------------------------------------

_TLD_LOOKAHEAD = "(?=[^0-9a-zA-Z@+-]|$))"
_AFTER_TLD = re.compile("[^0-9a-zA-Z@+-]", _I)
_PUNYCODE = re.compile(valid_punycode.pattern, _I)


def _tld_words(compiled: re.Pattern[str]) -> list[str]:
    words = compiled.pattern.removeprefix("(?:(?:").removesuffix(")" + _TLD_LOOKAHEAD)
    return words.split("|")


# What re's IGNORECASE compares: the simple lower case, with the few letters it treats as one
# (i and dotless i, s and long s, ...) brought to one of them.
_SAME_CASE = {code: min((*group, code)) for code, group in _casefix._EXTRA_CASES.items()}


class _FoldTable(dict[int, int]):
    """A ``str.translate`` table that folds each character as re's IGNORECASE does, filled as
    met; with the first plane only, so that it stays small whatever text comes."""

    def __missing__(self, code: int) -> int:
        lower = _sre.unicode_tolower(code)
        folded = _SAME_CASE.get(lower, lower)
        if code <= 0xFFFF:
            self[code] = folded
        return folded


_FOLD = _FoldTable()

# The first alternative of valid_gtld|valid_cctld that matches wins: keep each word's place.
_TLD_ORDER: dict[str, int] = {}
for _place, _word in enumerate(_tld_words(valid_gtld) + _tld_words(valid_cctld)):
    _TLD_ORDER.setdefault(_word.translate(_FOLD), _place)
_TLD_LENGTHS = sorted({len(word) for word in _TLD_ORDER})
_TLD_OPENINGS = {word[:2] for word in _TLD_ORDER} | {"xn"}  # every TLD has two letters or more


def _tld_end(text: str, at: int, endpos: int) -> int | None:
    """Where ``(?:valid_gtld|valid_cctld|valid_punycode)`` matched at ``at`` ends, if it does."""
    folded = text[at : min(at + _TLD_LENGTHS[-1], endpos)].translate(_FOLD)
    if folded[:2] not in _TLD_OPENINGS:
        return None
    best: tuple[int, int] | None = None
    for length in _TLD_LENGTHS:
        if length > len(folded):
            break
        place = _TLD_ORDER.get(folded[:length])
        end = at + length
        if place is not None and (best is None or place < best[0]):
            if end == endpos or _AFTER_TLD.match(text, end):
                best = (place, end)
    if best is not None:
        return best[1]
    punycode = _PUNYCODE.match(text, at, endpos)
    return punycode.end() if punycode else None


# --- domains ------------------------------------------------------------------------------------


class _Domains:
    """Where ``valid_domain`` matches from any place, each run of labels settled once.

    From a start inside a run of label characters that ends in a dot, the expression takes as
    many ``label.`` as follow one another, then gives them back one at a time until a last label
    without "_" is followed by a top-level domain. Which one that is depends only on the run, so
    it is worked out for every run from the right, reusing the next run's answer. Runs are kept
    in parallel lists, by their place in ``starts``.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts: list[int] = []
        self.dots: list[int] = []
        for match in _DOTTED_RUN.finditer(text):
            self.starts.append(match.start())
            self.dots.append(match.end() - 1)
        self.index = {start: run for run, start in enumerate(self.starts)}
        self._tlds: dict[int, int | None] = {}
        # Where a domain begun in a run ends if it goes on into the next run: that run's answer.
        self.deeper: list[int | None] = [None] * len(self.starts)
        for run in range(len(self.starts) - 1, -1, -1):
            following = self.index.get(self.dots[run] + 1)
            if following is not None:
                self.deeper[run] = self.end_at(self.starts[following])

    def tld_after(self, run: int) -> int | None:
        if run not in self._tlds:
            self._tlds[run] = _tld_end(self.text, self.dots[run] + 1, len(self.text))
        return self._tlds[run]

    def last_underscore(self, run: int) -> int:
        """A domain name (unlike a subdomain) has no "_": it can begin only after the last one."""
        return self.text.rfind("_", self.starts[run], self.dots[run])

    def end_from(self, run: int, start: int) -> int | None:
        """Where the domain matched from ``start`` (a label character in ``run``) ends, if one does."""
        if (deeper := self.deeper[run]) is not None:
            return deeper
        return self.tld_after(run) if start > self.last_underscore(run) else None

    def end_at(self, start: int) -> int | None:
        """The same for a ``start`` that begins a run (after ``//``, say)."""
        run = self.index.get(start)
        if run is None or not _DOMAIN_CHAR.match(self.text, start):
            return None
        return self.end_from(run, start)

    def first_start(self, run: int, low: int) -> int | None:
        """The first place from ``low`` in ``run`` where a URL without a protocol can begin."""
        if self.deeper[run] is None:
            if self.tld_after(run) is None:
                return None
            low = max(low, self.last_underscore(run) + 1)
        found = _URL_START.search(self.text, max(low, self.starts[run]), self.dots[run])
        return found.start() if found else None


@dataclass(frozen=True)
class _Match:
    """One match of twitter-text's ``extract_url``: its groups as spans."""

    before: str
    url_start: int
    domain_start: int  # after the protocol, if there is one
    domain_end: int
    has_path: bool
    end: int


def _url_matches(text: str) -> Iterator[_Match]:
    """``extract_url.finditer(text)``, in linear time."""
    domains = _Domains(text)
    protocols = [(match.start(), match.end()) for match in _PROTOCOL.finditer(text)]

    def url_at(start: int) -> tuple[int, int] | None:
        """(domain start, domain end) of a URL beginning at ``start``: with a protocol if it can."""
        protocol = _PROTOCOL.match(text, start)
        if protocol and (end := domains.end_at(protocol.end())) is not None:
            return protocol.end(), end
        run = _run_containing(domains, start)
        end = domains.end_from(run, start) if run is not None and _DOMAIN_CHAR.match(text, start) else None
        return (start, end) if end is not None else None

    def finish(before: str, start: int, domain: tuple[int, int]) -> _Match:
        after = _AFTER_DOMAIN.match(text, domain[1])
        assert after is not None  # every part of it is optional
        return _Match(before, start, domain[0], domain[1], after.group(2) is not None, after.end())

    position, next_run, next_protocol = 0, 0, 0
    # At 0 the expression first takes text[0] as the preceding character, then tries "^".
    if text:
        if _PRECEDING_CHAR.match(text, 0) and (domain := url_at(1)):
            match = finish(text[0], 1, domain)
        elif domain := url_at(0):
            match = finish("", 0, domain)
        else:
            match = None
        if match:
            yield match
            position = match.end
    low = max(position + 1, 2)  # a URL after a preceding character at `position` or later
    while True:
        # The next URL with a protocol, and the next without one; the earlier is the match. A
        # place that cannot begin a URL now never can, so each is passed over once.
        candidate: tuple[int, tuple[int, int]] | None = None
        while next_protocol < len(protocols):
            start, end = protocols[next_protocol]
            if start >= low and _PRECEDING_CHAR.match(text, start - 1) and (found := domains.end_at(end)):
                candidate = (start, (end, found))
                break
            next_protocol += 1
        while next_run < len(domains.starts):
            run = next_run
            start = domains.first_start(run, low) if domains.dots[run] > low else None
            if start is None:
                next_run += 1
                continue
            if candidate is None or start < candidate[0]:
                end = domains.end_from(run, start)
                assert end is not None
                candidate = (start, (start, end))
            break
        if candidate is None:
            return
        start, domain = candidate
        match = finish(text[start - 1], start, domain)
        yield match
        low = match.end + 1


def _run_containing(domains: _Domains, position: int) -> int | None:
    """The dotted run that ``position`` (0 or 1) lies in, if any."""
    for start in {0, position}:
        run = domains.index.get(start)
        if run is not None and start <= position < domains.dots[run]:
            return run
    return None


def _ascii_domains(domain: str) -> Iterator[tuple[int, int]]:
    """``valid_ascii_domain.finditer(domain)`` as spans, in linear time: like ``_Domains``, each
    run of labels is settled once, from the right."""
    runs = [(match.start(), match.end() - 1) for match in _DOTTED_ASCII_RUN.finditer(domain)]
    starts = {run_start: index for index, (run_start, _) in enumerate(runs)}
    ends: list[int | None] = [None] * len(runs)
    for index in range(len(runs) - 1, -1, -1):
        dot = runs[index][1]
        following = starts.get(dot + 1)
        deeper = ends[following] if following is not None else None
        ends[index] = deeper if deeper is not None else _tld_end(domain, dot + 1, len(domain))
    position = 0
    for index, (run_start, dot) in enumerate(runs):
        found = ends[index]
        if dot > position and found is not None:
            yield max(run_start, position), found
            position = found


# --- what twitter-text's functions return ---------------------------------------------------------

# IDNA encoding is the slow part of telling a URL valid, and a text repeats its domains.
_punycode = lru_cache(maxsize=4096)(idna_to_ascii)


def is_valid_url(url: str, protocol: str, domain: str) -> bool:
    """twitter-text's ``is_valid_url``, with its IDNA encoding remembered."""
    encoded = _punycode(domain)
    return bool(encoded) and len(protocol) + len(url) + len(encoded) - len(domain) <= max_url_length


def extract_urls_with_indices(text: str, extract_urls_without_protocol: bool = True) -> list[dict]:
    """twitter-text's ``extract_urls_with_indices``, with the same results, in linear time."""
    if text == "" or ("." not in text if extract_urls_without_protocol else ":" not in text):
        return []
    urls: list[dict] = []
    for match in _url_matches(text):
        url = text[match.url_start : match.end]
        protocol = text[match.url_start : match.domain_start] or None
        domain = text[match.domain_start : match.domain_end]
        if not is_valid_url(url, protocol or default_protocol, domain):
            continue
        if protocol is None:
            if not extract_urls_without_protocol or invalid_url_without_protocol_preceding_chars.match(match.before):
                continue
            last_url = None
            for ascii_start, ascii_end in _ascii_domains(domain):
                last_url = {
                    "url": domain[ascii_start:ascii_end],
                    "indices": [match.domain_start + ascii_start, match.domain_start + ascii_end],
                }
                urls.append(last_url)
            if last_url is None:
                continue
            if match.has_path:
                last_url["url"] = url.replace(domain, last_url["url"])
                last_url["indices"][1] = match.end
        else:
            start, end = match.url_start, match.end
            tco = valid_tco_url.search(url)
            if tco:
                slug = tco.group(1)
                if slug and len(slug) > max_tco_slug_length:
                    continue
                url = tco.group(0)
                end = start + len(url)
            urls.append({"url": url, "indices": [start, end]})
    return urls


# --- emoji --------------------------------------------------------------------------------------

_EMOJI_SEQUENCES: set[str] = set()
_SEQUENCE_LENGTHS: dict[str, list[int]] = {}  # by first character: the lengths to try, longest first
for _emoji in emoji_list:
    _codes = _emoji.codepoint.split()
    if len(_codes) > 1:
        _sequence = "".join(chr(int(code, 16)) for code in _codes)
        _EMOJI_SEQUENCES.add(_sequence)
        _SEQUENCE_LENGTHS.setdefault(_sequence[0], []).append(len(_sequence))
for _lengths in _SEQUENCE_LENGTHS.values():
    _lengths[:] = sorted(set(_lengths), reverse=True)
_SINGLE_EMOJI = frozenset(chr(code) for low, high in single_codepoint_emoji_ranges for code in range(low, high + 1))
# Where an emoji may begin. re tests a class of characters beyond the first plane one range at a
# time, so those are all let through here and told apart by the lookups.
_EMOJI_START = re.compile(
    "["
    + "".join(re.escape(char) for char in sorted(_SEQUENCE_LENGTHS.keys() | _SINGLE_EMOJI) if char <= "\uffff")
    + "]|[\U00010000-\U0010ffff]"
)


def extract_emojis_with_indices(text: str) -> list[dict]:
    """twitter-text's ``extract_emojis_with_indices``. Its expression tries the sequences of most
    code points first, then the single ones: at each place the longest emoji there wins."""
    found: list[dict] = []
    position = 0
    for candidate in _EMOJI_START.finditer(text):
        start = candidate.start()
        if start < position:
            continue
        end = None
        for length in _SEQUENCE_LENGTHS.get(text[start], ()):
            if start + length <= len(text) and text[start : start + length] in _EMOJI_SEQUENCES:
                end = start + length
                break
        if end is None and text[start] in _SINGLE_EMOJI:
            end = start + 1
        if end is not None:
            found.append({"emoji": text[start:end], "indices": [start, end]})
            position = end
    return found


# --- X's weighted length ------------------------------------------------------------------------

_X = _twitter_config["defaults"]
_LINE_ENDING = re.compile(r"\r\n|\r|\n")
_LIGHT_RANGES = "".join(f"\\U{r['start']:08x}-\\U{r['end']:08x}" for r in _X["ranges"])
_LIGHT_CHARS = re.compile(f"[{_LIGHT_RANGES}]+")
assert {r["weight"] for r in _X["ranges"]} == {_X["scale"]}, "twitter-text's ranges all weigh one unit"


def weighted_length(text: str) -> int:
    """``parse_tweet(text).weightedLength`` (twitter-text's default config), in linear time."""
    normalized = _LINE_ENDING.sub("\n", unicodedata.normalize("NFC", text))
    urls = {url["indices"][0]: url["url"] for url in extract_urls_with_indices(normalized)}
    emojis = (
        {emoji["indices"][0]: emoji["emoji"] for emoji in extract_emojis_with_indices(normalized)}
        if _X.get("emoji_parsing_enabled")
        else {}
    )
    total, position = 0, 0
    # parse_tweet walks the text, jumping over a URL (by the length of the URL it reports) or an
    # emoji that starts where it stands: the same jumps, with the characters between weighed at once.
    for start in sorted(urls.keys() | emojis.keys()):
        if start < position:
            continue
        total += _weigh(normalized, position, start)
        if start in urls:
            total += _X["transformed_url_length"] * _X["scale"]
            position = start + len(urls[start])
        else:
            total += _X["default_weight"]
            position = start + len(emojis[start])
    total += _weigh(normalized, position, len(normalized))
    return int(total / _X["scale"])


def _weigh(text: str, start: int, end: int) -> int:
    if start >= end:
        return 0
    light = sum(match.end() - match.start() for match in _LIGHT_CHARS.finditer(text, start, end))
    return light * _X["scale"] + (end - start - light) * _X["default_weight"]
