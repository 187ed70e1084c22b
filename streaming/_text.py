"""Splitting a hypothesis into the part that has settled and the part that may still change."""

from __future__ import annotations

import os

_CJK_START = 0x2E80  # scripts from here on are written without spaces between words


def _in_word(char: str) -> bool:
    return char.isalnum() and ord(char) < _CJK_START or char in "'’-"


def stable_prefix(previous: str, current: str) -> str:
    """The prefix of ``current`` that ``previous`` agrees with, never ending inside a word."""
    common = os.path.commonprefix([previous, current])
    if len(common) == len(current):
        return common
    # Back up to a word start if the agreement ends inside a word of either hypothesis.
    cut = len(common)
    while cut > 0 and _in_word(current[cut - 1]) and (_in_word(current[cut]) or _continues(previous, cut)):
        cut -= 1
    return current[:cut]


def _continues(previous: str, cut: int) -> bool:
    return cut < len(previous) and _in_word(previous[cut])
