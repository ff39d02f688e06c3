"""Counting as each network counts, cuts that break no grapheme, word or link, and the formats."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest
import regex
import twitter_text
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wordclaw_mcp import entities
from wordclaw_mcp.text import (
    Limit,
    TooComplex,
    cut,
    deadline,
    graphemes,
    html_to_markdown,
    limit_for,
    link_facets,
    markdown_to_html,
    markdown_to_text,
    urls,
)

LONG_URL = "https://example.com/" + "a" * 80
THUMBS = "\U0001f44d\U0001f3fd"  # thumbs up, medium skin tone: two code points, one grapheme
FLAG = "\U0001f1eb\U0001f1f7"  # regional indicators F and R: two code points, one grapheme
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # joined by ZWJ: five code points, one grapheme
E_ACUTE = "e\u0301"  # e and a combining acute accent: one grapheme


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello", 5),
        ("Ünïcödé", 7),  # Latin with diacritics weighs 1
        ("日本語", 6),  # CJK weighs 2
        (THUMBS, 2),  # an emoji sequence weighs 2, whatever its code points
        (FAMILY, 2),
        (f"see {LONG_URL}", 4 + 23),  # every URL is 23
        ("see example.com", 4 + 23),  # X also links bare domains
        (E_ACUTE, 1),  # counted after NFC normalisation: é
    ],
)
def test_x_weighs_characters_and_counts_every_url_as_23(text: str, expected: int) -> None:
    assert limit_for("x").length(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello", 5),
        ("日本語", 3),
        (f"see {LONG_URL} now", 4 + 23 + 4),
        ("see example.com", 15),  # no scheme, no link
        (f"{LONG_URL} {LONG_URL}", 23 + 1 + 23),
    ],
)
def test_mastodon_counts_graphemes_and_every_linked_url_as_23(text: str, expected: int) -> None:
    assert limit_for("mastodon").length(text) == expected


@pytest.mark.parametrize(
    ("text", "graphemes_", "utf8_bytes"),
    [
        ("hello", 5, 5),
        (THUMBS, 1, 8),
        (FLAG, 1, 8),
        (FAMILY, 1, 18),
        (E_ACUTE, 1, 3),
        ("日本語", 3, 9),
    ],
)
def test_bluesky_counts_graphemes_and_caps_bytes(text: str, graphemes_: int, utf8_bytes: int) -> None:
    assert limit_for("bluesky").length(text) == graphemes_ == len(graphemes(text))
    assert len(text.encode()) == utf8_bytes
    # 300 family emoji are 300 graphemes but 5,400 bytes: over Bluesky's 3,000.
    assert limit_for("bluesky").fits(FAMILY * 166) and not limit_for("bluesky").fits(FAMILY * 167)


def test_a_limit_can_be_an_instances_own() -> None:
    assert limit_for("mastodon", 1000).max_length == 1000
    with pytest.raises(ValueError, match="unknown counting rule"):
        limit_for("myspace")


def test_text_that_fits_is_left_whole() -> None:
    result = cut("short and sweet", limit_for("x"), suffix=" https://example.com/p")
    assert (result.text, result.truncated, result.length) == ("short and sweet https://example.com/p", False, 39)


def test_a_cut_falls_at_the_end_of_a_word_with_an_ellipsis() -> None:
    result = cut("one two three four five", Limit("characters", 14))
    assert (result.text, result.truncated, result.cut_at, result.length) == ("one two three…", True, 13, 14)


def test_a_cut_keeps_the_link_asked_for_and_never_cuts_inside_a_url() -> None:
    link = "\nhttps://example.com/posts/launch"
    text = "word " * 100 + LONG_URL + " tail"
    result = cut(text, limit_for("x"), suffix=link)
    assert result.truncated and result.text.endswith("…" + link) and result.length <= 280
    # The long URL in the text is whole or gone, never half there.
    body = result.text.removesuffix("…" + link)
    assert LONG_URL in body or "https://example.com/a" not in body
    # Mastodon: the same text where the URL, counted 23, fits whole.
    near = "word " * 90 + LONG_URL + " more words after the link"
    assert LONG_URL in cut(near, limit_for("mastodon"), suffix=link).text


@pytest.mark.parametrize("unit", [THUMBS, FLAG, FAMILY, E_ACUTE, "日"])
def test_a_word_too_long_to_fit_is_cut_between_graphemes_never_inside_one(unit: str) -> None:
    result = cut(unit * 400, limit_for("bluesky"))
    assert result.truncated and result.length <= 300
    kept = result.text.removesuffix("…")
    assert kept == unit * (len(kept) // len(unit)), "a grapheme was split"
    assert len(result.text.encode()) <= 3000


def test_a_suffix_that_cannot_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="no room"):
        cut("text", Limit("characters", 5), suffix=" https://example.com")


def test_urls_are_found_with_their_positions() -> None:
    text = f"read {LONG_URL} or example.org"
    assert urls(text) == [(5, 5 + len(LONG_URL), LONG_URL)]
    assert [u[2] for u in urls(text, schemes_only=False)] == [LONG_URL, "example.org"]


def test_markdown_becomes_html_with_raw_html_escaped_and_unsafe_links_dropped() -> None:
    html = markdown_to_html("Hi <script>alert(1)</script> [ok](https://e.com) [bad](javascript:alert(1))")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<a href="https://e.com">ok</a>' in html
    assert "javascript:" not in html.split("[bad]")[0] and 'href="javascript' not in html


def test_html_becomes_markdown_without_its_scripts() -> None:
    markdown = html_to_markdown(
        "<h2>Title</h2><p>Some <em>text</em> and <a href='https://e.com'>a link</a>.</p><script>x()</script>"
    )
    assert markdown.startswith("## Title")
    assert "*text*" in markdown and "[a link](https://e.com)" in markdown and "x()" not in markdown


def test_plain_text_keeps_link_targets_and_drops_markup() -> None:
    text = markdown_to_text(
        "# Title\n\nSome **bold** [site](https://e.com) and <https://auto.example>.\n\n- one\n- two"
    )
    assert text == "Title\n\nSome bold site (https://e.com) and https://auto.example.\n\n- one\n\n- two"


def test_a_url_too_long_to_fit_is_left_out_whole_rather_than_cut() -> None:
    result = cut("https://example.com/" + "a" * 400, limit_for("bluesky"))
    assert (result.text, result.cut_at) == ("…", 0)


# --- twitter-text's answers, in linear time ------------------------------------------------------
# entities.py finds URLs and emoji without twitter-text's repeated work; on short texts (where
# that work costs nothing) it must give exactly twitter-text's answers.

URL_PIECES = [
    "http://", "https://", "HTTPS://", "hTTp://", "www.", "example", "a", "b", ".", "..", "com", "co", "uk", "jp",
    "COM", "cOm", "onion", "t.co/", "xn--", "xn--p1ai", "-", "_", "/", "?", "#", "@", "＠", "(", ")", ":", "80",
    " ", "\n", "\r\n", "\u3000", "\x85", "日本", "中国", "рф", "삼성", "é", "ı", "İ", "ſ", "K", "ＣＯＭ", "\u200e",
    "\u202a", "\ufeff", "'", '"', "!", ",", ";", "&", "=", "$", "%", "~", "|", "[", "]", "+", "…", "–", "\u0301",
    "x", "1", "ab_c", "a-b", "😷", FAMILY, THUMBS, FLAG, "1\ufe0f\u20e3", "#\ufe0f\u20e3", "@alice", "@bob@example.org",
    # Top-level domains that begin others: which matches is the first in twitter-text's list.
    "嘉里", "嘉里大酒店", "भारत", "भारतम्",
    # Emoji sequences that begin others (a white flag, a rainbow flag; a family of three, of four).
    "\U0001f3f3\ufe0f", "\u200d\U0001f308", "\u200d\U0001f466",
]  # fmt: skip
urlish_texts = st.lists(st.sampled_from(URL_PIECES) | st.text(max_size=3), max_size=30).map("".join)


@settings(max_examples=500, deadline=None)
@given(urlish_texts)
@example("a.嘉里大酒店 and https://b.भारतम्/x?y=1")  # two top-level domains match: the first listed wins
@example("éa.com, a.a.a.a.日本.com, http://t.co/abcdefghijklmnopqrstuvwxyz0123456789abcdefghij")
def test_urls_are_found_exactly_as_twitter_text_finds_them(text: str) -> None:
    for bare_domains in (True, False):
        assert entities.extract_urls_with_indices(text, bare_domains) == twitter_text.extract_urls_with_indices(
            text, bare_domains
        )


@settings(max_examples=500, deadline=None)
@given(urlish_texts)
@example(f"\U0001f3f3\ufe0f\u200d\U0001f308 {FAMILY}\u200d\U0001f466 {FAMILY}")  # the longest sequence wins
def test_x_weighs_text_and_finds_emoji_exactly_as_twitter_text_does(text: str) -> None:
    assert entities.extract_emojis_with_indices(text) == twitter_text.extract_emojis_with_indices(text)
    assert limit_for("x").length(text) == twitter_text.parse_tweet(text).weightedLength


def _cpu_seconds(work: Callable[[], object]) -> float:
    """The least CPU time of this thread over three runs: other processes' load does not count."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        work()
        best = min(best, time.thread_time() - started)
    return best


PATHOLOGICAL = [
    "a.", "日.", "-a.", "a_b.", "co.", "a.a.a.a.日本.com", "http://a.", "https://a.co/日 ", "😷", "1", "@a.", "[", "<",
]  # fmt: skip


@pytest.mark.parametrize("unit", PATHOLOGICAL)
def test_counting_and_finding_urls_take_time_linear_in_the_text(unit: str) -> None:
    # Four times the text, about four times the work: twitter-text's extractor takes sixteen
    # times as long on "a." * n (../shared/REFERENCE.md); the bound leaves room for noise.
    def work(size: int) -> Callable[[], object]:
        text = unit * (size // len(unit))
        return lambda: (
            urls(text, schemes_only=False),
            limit_for("x").length(text),
            limit_for("mastodon").length(text),
            link_facets(text),
        )

    small, large = _cpu_seconds(work(6_000)), _cpu_seconds(work(24_000))
    assert large < 8 * max(small, 0.002), (small, large)


def test_link_facets_take_time_linear_in_the_text() -> None:
    # Each facet's byte offset is counted on from the one before, not from the start.
    def work(size: int) -> Callable[[], object]:
        text = "https://a.co/日 " * (size // 15)
        return lambda: link_facets(text)

    small, large = _cpu_seconds(work(50_000)), _cpu_seconds(work(200_000))
    assert large < 8 * max(small, 0.002), (small, large)


@pytest.mark.parametrize("rule", ["x", "mastodon", "bluesky"])
@pytest.mark.parametrize("unit", ["a.", "日.", "😷", "word ", "e\u0301", "https://a.co/x "])
def test_cutting_a_long_text_takes_time_linear_in_it(rule: str, unit: str) -> None:
    # Only the opening that can matter is counted; the rest is only searched for spaces.
    def work(size: int) -> Callable[[], object]:
        text = unit * (size // len(unit))
        return lambda: cut(text, limit_for(rule), suffix="\n\nhttps://example.com/p")

    small, large = _cpu_seconds(work(100_000)), _cpu_seconds(work(400_000))
    assert large < 8 * max(small, 0.005), (small, large)


# --- Mastodon ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", [FAMILY, FLAG, THUMBS, "\U0001f44b\U0001f3ff", E_ACUTE])
def test_mastodon_counts_graphemes_however_many_code_points_they_have(unit: str) -> None:
    mastodon = limit_for("mastodon", 200)
    assert mastodon.length(unit * 200) == 200
    assert mastodon.fits(unit * 200) and not mastodon.fits(unit * 201)
    result = cut(unit * 600, limit_for("mastodon"))
    assert result.truncated and result.length == 500 and result.text == unit * 499 + "…"


@pytest.mark.parametrize(
    ("text", "counted_as"),
    [
        ("hi @alice@mastodon.social!", "hi @alice!"),  # a remote mention counts as its user part
        ("hi @alice", "hi @alice"),
        ("@Bob_1@sub.example.co.uk and @carol@b.c", "@Bob_1 and @carol"),
        ("mail@example.com", "mail@example.com"),  # a word before the @: not a mention
        ("@alice@example.com@x", "@alice@example.com@x"),  # followed by an @: not one either
        ("@alice@example.com://x", "@alice@example.com://x"),
        ("@alice@" + "d" * 254, "@alice@" + "d" * 254),  # a domain longer than 253
        (f"@alice@example.com {LONG_URL}", "@alice " + "x" * 23),
        (f"{LONG_URL}?q=@alice@example.com", "x" * 23),  # a mention inside a URL is the URL's
        ("see example.com", "see example.com"),  # no scheme, no link
        (f"{FAMILY} {LONG_URL}", "x " + "x" * 23),
        (" \n\u3000 ", ""),  # a blank status counts nothing
    ],
)
def test_mastodon_counts_urls_as_23_and_remote_mentions_as_the_user(text: str, counted_as: str) -> None:
    assert limit_for("mastodon").length(text) == len(graphemes(counted_as))


def test_a_mastodon_cut_is_made_on_what_mastodon_counts() -> None:
    mention = "@someone@a-very-long-instance-name.example.social"
    text = f"{mention} " * 100  # 5,000 characters, 900 as Mastodon counts: "@someone " 100 times
    result = cut(text, limit_for("mastodon"))
    # 55 mentions with their spaces and the ellipsis are 495: a 56th would be 504.
    assert (result.length, result.text.count(mention)) == (495, 55)
    assert len(result.text) > 2_500


# --- cuts, as before, at any length ---------------------------------------------------------------

cut_pieces = st.sampled_from(
    [" ", "  ", "\n", "word", "longerword", LONG_URL, "example.com", FAMILY, FLAG, E_ACUTE, "日本語", "@a@b.c", "a."]
)
long_texts = st.lists(cut_pieces, min_size=1, max_size=600).map("".join)


def unwindowed_cut(text: str, limit: Limit, suffix: str) -> str:
    """The cut as it was made before, measuring the whole text every time."""
    whole = text + suffix
    if limit.fits(whole):
        return whole
    linked = urls(text, schemes_only=False)
    inside = {i for start, end, _ in linked for i in range(start + 1, end)}
    ends = [m.start() for m in regex.finditer(r"\s+", text) if m.start() > 0]

    def fits(end: int) -> bool:
        return limit.fits(text[:end].rstrip() + "…" + suffix)

    best = max((end for end in ends if fits(end)), default=None)
    if best is None:
        boundaries = list(itertools.accumulate(len(cluster) for cluster in graphemes(text)))
        best = max((end for end in boundaries if end not in inside and fits(end)), default=0)
    return text[:best].rstrip() + "…" + suffix


@settings(max_examples=60, deadline=None)
@given(long_texts, st.sampled_from(["x", "mastodon", "bluesky"]), st.integers(min_value=30, max_value=300))
def test_a_cut_of_a_long_text_is_the_cut_measured_over_the_whole(text: str, rule: str, length: int) -> None:
    limit = limit_for(rule, length)
    suffix = "\n\nhttps://example.com/p"
    result = cut(text, limit, suffix=suffix)
    assert limit.fits(result.text)
    assert result.text == unwindowed_cut(text, limit, suffix)


# --- conversions that cannot run on -----------------------------------------------------------------


def test_html_nested_deeper_than_markdownify_can_go_is_refused_not_crashed() -> None:
    for html in ("<div>" * 3000 + "x" + "</div>" * 3000, "<b>" * 3000, "<p>" * 100_000, "<ul><li>" * 200):
        with pytest.raises(TooComplex, match="nested more than 100 deep"):
            html_to_markdown(html)
    assert html_to_markdown("<div>" * 90 + "deep" + "</div>" * 90) == "deep"


@pytest.mark.parametrize(
    ("convert", "source"),
    [
        (markdown_to_html, "[" * 50_000),
        (markdown_to_text, "a\n" * 50_000),
        (html_to_markdown, "<b>x</b>" * 20_000),
        (html_to_markdown, "<" * 50_000),
    ],
)
def test_a_conversion_past_its_deadline_stops_with_too_complex(convert: Callable[[str], str], source: str) -> None:
    with deadline(time.monotonic()), pytest.raises(TooComplex, match="takes longer"):
        convert(source)
    assert convert(source)  # without a deadline it runs to the end
