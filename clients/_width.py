"""Display width of text in terminal columns (and subtitle lines), with wcwidth.

A Chinese character takes two columns, a combining mark none; a character is kept together with
the zero-width ones that belong to it, so text is never cut between them.
"""

from __future__ import annotations

from wcwidth import wcswidth, wcwidth

ZWJ = "\u200d"


def char_width(char: str) -> int:
    """Columns of one character on its own; 0 for marks, joiners and what no terminal prints."""
    return max(wcwidth(char), 0)


def clusters(text: str) -> list[str]:
    """The characters, each with the zero-width ones that belong to it (combining marks, a joiner and
    what it joins, variation selectors, Hangul jamo): truncating between them would orphan or widen them."""
    found: list[str] = []
    for char in text:
        if found and (wcwidth(char) == 0 or found[-1][-1] == ZWJ):
            found[-1] += char
        else:
            found.append(char)
    return found


def cluster_width(cluster: str) -> int:
    """Columns, the wider of the ways a terminal may draw it: as one glyph (a joined emoji; a selector that
    widens its base) or one character at a time (a terminal that does not join): it must fit either way."""
    if len(cluster) == 1:
        return char_width(cluster)
    return max(wcswidth(cluster), sum(map(char_width, cluster)))


def display_width(text: str) -> int:
    """Columns on a terminal or a subtitle line: CJK and other wide characters take two, marks none."""
    return sum(map(cluster_width, clusters(text)))
