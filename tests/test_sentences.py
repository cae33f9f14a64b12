"""Speakable sentences and sign lines (npu/sentences.py): whole units, in order, joining to the text."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npu.sentences import Chunker, split_lines, split_sentences

WORDS = st.sampled_from([
    "Dr.", "Mr.", "e.g.", "U.S.", "3.50", "1.", "word", "Hello.", "Why?", "Yes!", '"Wow!"', "'Hi.'",
    "...", "(see", "p.", "5)", "and", "the", "a", "Ünïcödé", "日本語。", "long" * 12, "\n", "\n\n", "",
])
TEXTS = st.lists(WORDS, max_size=40).map(" ".join) | st.text(max_size=120)


def stream(chunker: Chunker, text: str, cuts: list[int]) -> list[str]:
    """Feed ``text`` in pieces cut at ``cuts`` (as a model's deltas arrive), then flush."""
    units: list[str] = []
    last = 0
    for cut in sorted(set(cuts)):
        units += chunker.feed(text[last:cut])
        last = cut
    units += chunker.feed(text[last:])
    return units + chunker.flush()


@given(TEXTS, st.lists(st.integers(0, 200), max_size=30), st.integers(8, 200),
       st.sampled_from(["sentence", "line"]))
def test_units_join_to_the_text_and_fit_the_width(text: str, cuts: list[int], width: int, mode: str) -> None:
    units = stream(Chunker(mode, width), text, [c for c in cuts if c <= len(text)])  # type: ignore[arg-type]
    assert "".join(units) == text
    assert all(units), "no empty unit is handed out"
    for unit in units:
        assert len(unit.rstrip()) <= width
        if mode == "line":  # a sign shows the piece as sent: its trailing space fits too
            assert len(unit.removesuffix("\n")) <= width, unit


@given(st.lists(st.sampled_from(["alpha", "be", "gamma", "delta", "epsilon"]), min_size=1, max_size=30),
       st.integers(8, 40), st.lists(st.integers(0, 300), max_size=20))
def test_lines_never_split_a_word_that_fits(words: list[str], width: int, cuts: list[int]) -> None:
    text = " ".join(words)
    lines = stream(Chunker("line", width), text, [c for c in cuts if c <= len(text)])
    assert [w for line in lines for w in line.split()] == words
    for line, following in itertools.pairwise(lines):
        assert line[-1].isspace(), f"{line!r} ends inside a word"
        first = following.split()[0]
        after = 1 if len(following) > len(first) else 0  # the space after it, unless it ends the text
        assert len(line) + len(first) + after > width, "greedy: the next word with its space did not fit"


def test_a_sign_line_with_its_trailing_space_fits_the_width() -> None:
    lines = split_lines("Shadowborn. I'm your guide tonight, traveller.", 20)
    assert "".join(lines) == "Shadowborn. I'm your guide tonight, traveller."
    assert lines == ["Shadowborn. I'm ", "your guide tonight, ", "traveller."]
    assert all(len(line) <= 20 for line in lines)


def test_abbreviations_numbers_and_quotes_stay_inside_their_sentence() -> None:
    text = ('Dr. Smith paid $3.50 for it. He said "Wow!" and left... Then e.g. the U.S. army came. '
            "Mr. Jones? Yes.")
    assert split_sentences(text) == [
        "Dr. Smith paid $3.50 for it. ", 'He said "Wow!" and left... ', "Then e.g. the U.S. army came. ",
        "Mr. Jones? ", "Yes.",
    ]


def test_a_sentence_is_handed_out_once_the_next_has_begun_and_never_before() -> None:
    chunker = Chunker("sentence")
    assert chunker.feed("It costs 3.") == []
    assert chunker.feed("50 dollars. ") == []  # the last sentence may go on
    assert chunker.feed("Dr") == ["It costs 3.50 dollars. "]  # the next sentence has begun
    assert chunker.feed(". Who pays") == []  # "Dr." does not end it
    assert chunker.feed(" the bill?") == []
    assert chunker.flush() == ["Dr. Who pays the bill?"]


def test_a_run_on_is_cut_at_a_space_within_the_width() -> None:
    text = "and then " * 30
    units = split_sentences(text, width=40)
    assert "".join(units) == text
    assert all(len(u.rstrip()) <= 40 and u.endswith(" ") for u in units)
    assert split_sentences("x" * 25, width=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_lines_follow_newlines_and_the_width() -> None:
    assert split_lines("The quick brown fox jumps over the lazy dog\nEnd", 16) == [
        "The quick brown ", "fox jumps over ", "the lazy dog\n", "End"]
    assert split_lines("one " + "x" * 30, 10) == ["one ", "x" * 10, "x" * 10, "x" * 10]


@pytest.mark.parametrize(("mode", "width"), [("word", None), ("line", 2), ("sentence", 5000)])
def test_bad_settings_are_refused_with_a_sentence(mode: str, width: int | None) -> None:
    with pytest.raises(ValueError, match=r"chunk|width"):
        Chunker(mode, width)  # type: ignore[arg-type]
