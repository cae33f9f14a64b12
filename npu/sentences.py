"""Streamed text cut into speakable sentences, or into lines of a fixed width, never half a word.

A speaker, an LED sign or an e-paper frame wants whole units: ``Chunker`` takes the text as it is
generated, piece by piece (``feed``), and hands back only the units that can no longer change;
``flush`` gives the rest once the text has ended. Every unit is an exact slice of the text, the
whitespace after it included, so the units joined are the text itself; a sign strips them.

- ``sentence``: boundaries come from pysbd (rule-based sentence boundary detection: abbreviations
  such as "Dr." and "e.g.", decimal numbers, quoted speech, ellipses), run only on the text not
  yet handed out, so each delta costs about a sentence of work. A sentence is complete once the
  next one has begun; a run-on longer than ``width`` characters is cut at its last space before
  the limit (or at the limit when it has none), so one unit always fits the display or packet.
- ``line``: greedy word wrapping to ``width`` characters (a newline in the text ends a line), as
  ``textwrap`` does, but streamed: a line is final once a character past the width has arrived. A
  sign shows a piece as it comes, so a line is at most ``width`` characters with the space after
  its last word counted (a word that would end exactly at the width goes to the next line); only
  a newline ending the line comes on top, being the line's end rather than a character to show.

pysbd is used for the boundaries only: it drops leading whitespace and control characters from
its segments, so the cut points are found in the original text and the slices taken from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Literal

ChunkMode = Literal["sentence", "line"]
SENTENCE_WIDTH = 160  # characters: the hard cap of a run-on sentence (fits a 256-byte packet)
LINE_WIDTH = 32
MIN_WIDTH = 8
MAX_WIDTH = 4096


@cache
def _segmenter() -> object:
    import pysbd  # imported on first use: loading its rules costs ~50 ms

    return pysbd.Segmenter(language="en", clean=False)


def sentence_starts(text: str) -> list[int]:
    """Where each sentence after the first begins in ``text`` (offsets into ``text`` itself)."""
    segments: list[str] = _segmenter().segment(text)  # type: ignore[attr-defined]
    starts: list[int] = []
    cursor = 0
    for segment in segments:
        core = segment.strip()
        if not core:
            continue
        found = text.find(core, cursor)
        if found < 0:
            break  # pysbd changed the text in a way we cannot map: no boundary past here
        if found > 0 and (not starts or found > starts[-1]) and text[:found].strip():
            starts.append(found)
        cursor = found + len(core)
    return starts


def split_sentences(text: str, width: int = SENTENCE_WIDTH) -> list[str]:
    """The whole text as sentences (each at most ``width`` characters, its trailing space kept)."""
    chunker = Chunker("sentence", width)
    return [*chunker.feed(text), *chunker.flush()]


def split_lines(text: str, width: int = LINE_WIDTH) -> list[str]:
    """The whole text as lines of at most ``width`` characters, trailing space included (a newline
    ending a line is not counted)."""
    chunker = Chunker("line", width)
    return [*chunker.feed(text), *chunker.flush()]


def _cut_at_space(text: str, width: int) -> int:
    """Where a unit longer than ``width`` ends: after the last whitespace run within the first
    ``width + 1`` characters (so the visible part fits), else at ``width`` exactly."""
    window = text[: width + 1]
    for i in range(len(window) - 1, 0, -1):
        if window[i].isspace() and not window[i - 1].isspace():
            end = i
            while end < len(text) and text[end].isspace() and text[end] != "\n":
                end += 1
            return end
    return width


def _cut_line(text: str, width: int) -> int:
    """Where a sign line ends: after the last whitespace run that ends within ``width`` characters,
    so the line with its trailing space fits as sent and the next starts with a word; a word (or a
    run of spaces) longer than the width is cut at the width."""
    for end in range(min(width, len(text)), 0, -1):
        if text[end - 1].isspace() and (end == len(text) or not text[end].isspace()):
            return end
    return width


class Chunker:
    """Cut streamed text into sentences or lines; see the module docstring."""

    def __init__(self, mode: ChunkMode = "sentence", width: int | None = None) -> None:
        if mode not in ("sentence", "line"):
            raise ValueError(f"chunk must be 'sentence' or 'line', not {mode!r}")
        width = width if width is not None else (SENTENCE_WIDTH if mode == "sentence" else LINE_WIDTH)
        if not MIN_WIDTH <= width <= MAX_WIDTH:
            raise ValueError(f"width must be from {MIN_WIDTH} to {MAX_WIDTH} characters")
        self.mode: ChunkMode = mode
        self.width = width
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        """Add generated text; returns the units it completed (possibly none)."""
        self._pending += text
        return list(self._complete(final=False))

    def flush(self) -> list[str]:
        """The text has ended: the units still held (at most a few)."""
        units = list(self._complete(final=True))
        if self._pending:
            units.append(self._pending)
            self._pending = ""
        return units

    def _complete(self, final: bool) -> Iterator[str]:
        while self._pending:
            end = self._next_end(final)
            if end is None:
                return
            unit, self._pending = self._pending[:end], self._pending[end:]
            yield unit

    def _next_end(self, final: bool) -> int | None:
        """The end of the first unit of the pending text when it is final, else None."""
        text = self._pending
        if self.mode == "line":
            newline = text.find("\n")
            if 0 <= newline <= self.width:
                return newline + 1
            if len(text) > self.width:
                return _cut_line(text, self.width)
            return None
        starts = sentence_starts(text)
        # A sentence is done once the next one has begun (a letter or digit of it arrived); at the
        # end of the text every boundary counts.
        first = starts[0] if starts and (final or any(c.isalnum() for c in text[starts[0]:])) else None
        unit = text[: len(text) if first is None else first]
        if len(unit.rstrip()) > self.width:
            return _cut_at_space(text, self.width)  # a run-on: cut within the width
        return first
