"""StopMatcher: any split of a text into pieces gives the same, eagerly released output."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npu.llm.stops import StopMatcher


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Read character by character; cut at the first completed stop (the longest on ties)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


def longest_partial_tail(text: str, stops: list[str]) -> int:
    return max(
        (k for k in range(1, len(text) + 1) for s in stops if len(s) > k and s.startswith(text[-k:])),
        default=0,
    )


def run(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    emitted = []
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        emitted.append(out)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


alphabet = st.sampled_from(list("ab\n:U😀"))
stops_strategy = st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=0, max_size=3)
texts = st.text(alphabet, max_size=40)


@given(texts, stops_strategy, st.lists(st.integers(0, 1000), max_size=15))
def test_any_split_gives_text_up_to_the_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    expected, expect_stop = reference_cut(text, stops)
    emitted, stopped = run(StopMatcher(stops), split(text, cuts))
    assert "".join(emitted) == expected
    assert stopped == expect_stop


@given(texts, stops_strategy, st.lists(st.integers(0, 1000), max_size=15))
def test_releases_everything_that_cannot_start_a_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    """After each piece: shown text is final (never retracted) and only a stop prefix is held."""
    expected, _ = reference_cut(text, stops)
    matcher = StopMatcher(stops)
    shown = ""
    seen = ""
    for piece in split(text, cuts):
        out, stopped = matcher.feed(piece)
        shown += out
        seen += piece
        assert expected.startswith(shown)  # nothing shown is ever part of the stop
        if stopped:
            break
        assert shown + matcher.held == seen
        assert len(matcher.held) == longest_partial_tail(seen, stops)


def test_match_spanning_many_pieces() -> None:
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("Hello") == ("Hello", False)
    assert matcher.feed("\n") == ("", False)
    assert matcher.feed("Us") == ("", False)
    assert matcher.held == "\nUs"
    assert matcher.feed("e") == ("", False)
    assert matcher.feed("r: more") == ("", True)
    assert matcher.stopped and matcher.matched == "\nUser:"
    assert matcher.feed("later") == ("", True)
    assert matcher.flush() == ""


def test_false_start_is_released() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("a </") == ("a ", False)
    assert matcher.feed("b>") == ("</b>", False)
    assert matcher.flush() == ""


def test_text_before_the_match_in_the_same_piece() -> None:
    assert StopMatcher(["STOP"]).feed("abcSTOPdef") == ("abc", True)


def test_first_completed_wins_then_longest() -> None:
    assert StopMatcher(["abcd", "bc"]).feed("xabcd") == ("xa", True)
    matcher = StopMatcher(["bc", "abc"])
    assert matcher.feed("xabc") == ("x", True)
    assert matcher.matched == "abc"


def test_flush_releases_an_unfinished_prefix() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("end ##") == ("end ", False)
    assert matcher.flush() == "##"


def test_no_stops_is_a_pass_through() -> None:
    matcher = StopMatcher()
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])
