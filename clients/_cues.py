"""The times of a caption's atoms (its words, its CJK characters) from the aligner's units.

A final with word timestamps carries the aligner's units: the text's letters, digits and
apostrophes, in order, cut into words (every CJK ideograph one; Japanese and Korean as their
segmenters cut them), each with its start and end. Laid back onto the caption, they give each
atom the subtitle splitter keeps together a time of its own (``atom_spans``).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from asrlive._words import Word


@dataclass(frozen=True)
class Span:
    """Seconds; an atom without a unit of its own may end (with the word before) before it starts."""

    start: float
    end: float


def atom_spans(atoms: Sequence[str], words: Sequence[Word]) -> list[Span] | None:
    """Each atom's time: from the start of its first unit character to the end of its last.

    Walking the atoms' characters, each kept one must be the next unit character; any other
    (punctuation, a combining mark) may be one or be skipped. None when the units do not spell the
    text, or carry no usable time, so that the caller falls back to sharing the line's time out.
    """
    chars = _unit_chars(words)
    if chars is None:
        return None
    spans: list[Span | None] = []
    found = 0
    for atom in atoms:
        first = found
        for char in atom:
            if found < len(chars) and char == chars[found][0]:
                found += 1
            elif _kept(char):
                return None
        spans.append(Span(chars[first][1].start, chars[found - 1][1].end) if found > first else None)
    return _filled(spans) if found == len(chars) else None


def _unit_chars(words: Sequence[Word]) -> list[tuple[str, Span]] | None:
    """Each character of the units with an even share of its unit's time (a unit may span atoms:
    a Japanese word, a URL cut to fit a line), on a clock that never runs back: a unit does not
    start before the one before it ends. None for a time that is not a number."""
    chars: list[tuple[str, Span]] = []
    clock = -math.inf
    for word in words:
        if not (math.isfinite(word.start) and math.isfinite(word.end)):
            return None
        start = max(word.start, clock)
        end = clock = max(word.end, start)
        size = len(word.text)
        for k, char in enumerate(word.text):
            chars.append((char, Span(_share(start, end, k, size), _share(start, end, k + 1, size))))
    return chars


def _share(start: float, end: float, part: int, parts: int) -> float:
    """The time ``part`` of ``parts`` even shares into start..end, never past its end."""
    return end if part == parts else min(end, start + (end - start) * part / parts)


def _kept(char: str) -> bool:
    """A character the aligner keeps in its units: a letter, a digit, an apostrophe."""
    return char == "'" or unicodedata.category(char)[0] in "LN"


def _filled(spans: list[Span | None]) -> list[Span] | None:
    """An atom without a unit (a dash, an ellipsis) has no time of its own: it "starts" with the
    next word and "ends" with the one before (at the ends of the line, with its one neighbour), so a
    cue runs from its first word to its last, punctuation or not. None when no atom has a unit."""
    ends = _latest([None if span is None else span.end for span in spans])
    starts = _latest([None if span is None else span.start for span in reversed(spans)])[::-1]
    filled: list[Span] = []
    for span, before, after in zip(spans, ends, starts, strict=True):
        if span is None:
            start = after if after is not None else before
            end = before if before is not None else after
            if start is None or end is None:
                return None
            span = Span(start, end)
        filled.append(span)
    return filled


def _latest(values: list[float | None]) -> list[float | None]:
    """For each position, the last value that is not None before it."""
    latest: list[float | None] = []
    last = None
    for value in values:
        latest.append(last)
        last = value if value is not None else last
    return latest
