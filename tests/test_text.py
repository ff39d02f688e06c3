"""Counting as each network counts, cuts that break no grapheme, word or link, and the formats."""

from __future__ import annotations

import pytest

from wordclaw_mcp.text import (
    Limit,
    cut,
    graphemes,
    html_to_markdown,
    limit_for,
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
def test_mastodon_counts_characters_and_every_linked_url_as_23(text: str, expected: int) -> None:
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
