"""The text side of Qwen3-ForcedAligner (word timestamps): its units in, monotonic times out.

The aligner reads the transcript as a list of units (a word, or a single CJK ideograph), each
followed by two ``<timestamp>`` tokens (start, end), and classifies every ``<timestamp>`` into a
time class of ``segment_ms`` milliseconds. Which units the text becomes, how the classes turn
into milliseconds and how out-of-order predictions are repaired decide the timestamps a user
sees, so all of it follows transformers' ``Qwen3ASRProcessor`` (``split_words_for_alignment``,
``_fix_timestamps``, ``decode_forced_alignment``) to the bit; tests/test_align_text.py compares
them on generated inputs.

Japanese writes no spaces between words and Korean puts them between phrases of several words,
so their units come from segmenters: nagisa and soynlp, optional extras imported when needed.
"""

from __future__ import annotations

import importlib
import unicodedata
from collections.abc import Sequence
from types import ModuleType
from typing import Protocol

import numpy as np
from transformers.models.qwen3_asr.processing_qwen3_asr import LANGUAGE_CODE_TO_NAME

from ._prompt import normalize_language

# transformers' FORCED_ALIGNER_LANGUAGES, sorted (a test keeps the two equal).
ALIGNER_LANGUAGES: tuple[str, ...] = (
    "Cantonese",
    "Chinese",
    "English",
    "French",
    "German",
    "Italian",
    "Japanese",
    "Korean",
    "Portuguese",
    "Russian",
    "Spanish",
)
_CODE_OF = {name: code for code, name in LANGUAGE_CODE_TO_NAME.items()}

# Code points the aligner times one by one: CJK Unified Ideographs, Extensions A to E, the
# Compatibility Ideographs and their Supplement (whole blocks, unassigned code points included).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


class UnsupportedLanguage(ValueError):
    """A language the ASR model knows but the forced aligner was not trained on."""

    def __init__(self, language: str) -> None:
        supported = ", ".join(f"{name} ({_CODE_OF[name]})" for name in ALIGNER_LANGUAGES)
        super().__init__(f"the forced aligner does not support {language}; it supports: {supported}")
        self.language = language


class MissingSegmenter(ImportError):
    """Japanese or Korean word timestamps were asked for without their optional segmenter."""


class _Tokenizer(Protocol):
    """What is used of soynlp's ``LTokenizer``."""

    def tokenize(self, sentence: str) -> list[str]: ...


def aligner_language(language: str | None) -> str | None:
    """The aligner's name for ``language`` ("ja" -> "Japanese"); ``None`` when it is to be detected.

    Checked before any audio is aligned, so that an unsupported language fails at once with the
    list of supported ones rather than after the transcription, or by timing the wrong units.
    Unknown names raise ``normalize_language``'s ValueError; known ones the aligner lacks raise
    ``UnsupportedLanguage``.
    """
    name = normalize_language(language)
    if name is None or name in ALIGNER_LANGUAGES:
        return name
    raise UnsupportedLanguage(name)


def split_units(text: str, language: str | None) -> list[str]:
    """The units the aligner times in ``text``, as transformers forms them.

    ``language`` is an aligner language name (from ``aligner_language``) or ``None``. Japanese is
    segmented by nagisa, Korean by soynlp; every other language (and ``None``) gives one unit per
    CJK ideograph and one per whitespace-delimited run of letters, digits and apostrophes, with
    punctuation dropped (it is not spoken, so it has no time).
    """
    if language is not None and language not in ALIGNER_LANGUAGES:
        raise ValueError(f"expected an aligner language name (see aligner_language) or None, got {language!r}")
    text = text.strip()
    if language == "Japanese":
        return _clean(_japanese_words(text))
    if language == "Korean":
        return _clean(_korean_words(text))
    return _split_default(text)


def _is_cjk(char: str) -> bool:
    """Whether ``char`` is an ideograph the aligner times on its own (no spaces separate them)."""
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_kept(char: str) -> bool:
    """Whether ``char`` belongs in a unit: letters, digits, apostrophes ("don't") and ideographs."""
    return char == "'" or unicodedata.category(char)[0] in ("L", "N") or _is_cjk(char)


def _clean(words: Sequence[str]) -> list[str]:
    """A segmenter's words without the characters the aligner ignores, and without emptied words."""
    cleaned = ("".join(char for char in word if _is_kept(char)) for word in words)
    return [word for word in cleaned if word]


def _split_default(text: str) -> list[str]:
    """One unit per ideograph, one per whitespace-delimited run of kept characters.

    Dropped characters do not end a word: "e.g." is the unit "eg", "rock'n'roll" stays whole.
    """
    units: list[str] = []
    word: list[str] = []
    for char in text:
        if _is_cjk(char):
            _end_word(word, units)
            units.append(char)
        elif char.isspace():
            _end_word(word, units)
        elif _is_kept(char):
            word.append(char)
    _end_word(word, units)
    return units


def _end_word(word: list[str], units: list[str]) -> None:
    """Move the characters gathered so far, if any, to ``units`` as one unit."""
    if word:
        units.append("".join(word))
        word.clear()


def _japanese_words(text: str) -> list[str]:
    """nagisa's words for ``text`` (its model loads on the first import: about 1.5 s)."""
    nagisa = _import_segmenter("nagisa", "nagisa", "Japanese", "ja")
    words: list[str] = list(nagisa.tagging(text).words)
    return words


def _korean_words(text: str) -> list[str]:
    """soynlp's ``LTokenizer`` words without word scores, as transformers runs it.

    Without scores it keeps each space-delimited word whole, giving ``text.split()`` (a test
    checks it). The official Qwen toolkit passes it a dictionary of scores instead, which splits
    a word after a known stem ("학생입니다" -> "학생", "입니다").
    """
    tokenizer_module = _import_segmenter("soynlp.tokenizer", "soynlp", "Korean", "ko")
    tokenizer: _Tokenizer = tokenizer_module.LTokenizer()
    return list(tokenizer.tokenize(text))


def _import_segmenter(module: str, package: str, language: str, extra: str) -> ModuleType:
    """Import an optional segmenter, or say which extra installs it.

    Imported here rather than at the top: they are optional, and nagisa takes over a second to load.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"{language} word timestamps need the {package} package: pip install 'asrlive[{extra}]'"
        if (error.name or "").split(".")[0] != package:  # installed, but something it needs is not
            message += f" (importing {module} failed: {error})"
        raise MissingSegmenter(message) from error


def timestamp_ms(classes: Sequence[int], segment_ms: float) -> list[float]:
    """Milliseconds of the predicted time classes, rounded as the reference rounds them.

    The reference multiplies in float32 (``classes.float() * segment_ms``); products that float32
    rounds (large classes, a segment time such as 33.3) must round the same way here, or
    ``fix_timestamps`` would see different values.
    """
    scaled = np.asarray(classes, dtype=np.int64).astype(np.float32) * np.float32(segment_ms)
    return [float(value) for value in scaled]


def fix_timestamps(values: Sequence[float]) -> list[int]:
    """Times made non-decreasing, in whole milliseconds, exactly as transformers' ``_fix_timestamps``.

    The aligner predicts every time independently, so some come out of order. The longest
    non-decreasing run of them is trusted; each block of the others is replaced from its trusted
    neighbours: one or two times snap to the nearer one (a tie to the left), longer blocks are
    spread evenly between them, and a block with a neighbour on one side only copies it.
    """
    data = [float(value) for value in values]
    if not data:
        return []
    trusted = _longest_chain(np.asarray(data, dtype=np.float64))
    result = list(data)
    start = 0
    while start < len(data):
        if trusted[start]:
            start += 1
            continue
        end = start
        while end < len(data) and not trusted[end]:
            end += 1
        left = data[start - 1] if start > 0 else None  # blocks are maximal: the neighbours are trusted
        right = data[end] if end < len(data) else None
        result[start:end] = _fill_block(left, right, end - start)
        start = end
    return [int(value) for value in result]


def _longest_chain(data: np.ndarray) -> list[bool]:
    """Marks the longest non-decreasing subsequence that the reference's O(n^2) search picks.

    Among equally long ones that is: each element's predecessor is the first earlier element
    with the longest chain ending there, and the chain ends at the first element where the
    longest length is reached. The inner loop is vectorised (3000 values: milliseconds, not
    seconds) with the same comparisons, so NaNs chain with nothing in both.
    """
    count = len(data)
    length = np.ones(count, dtype=np.int64)
    parent = np.full(count, -1, dtype=np.int64)
    for current in range(1, count):
        lengths_before = np.where(data[:current] <= data[current], length[:current], 0)
        best = int(lengths_before.argmax())  # argmax: the first of the longest
        if lengths_before[best] > 0:
            length[current] = lengths_before[best] + 1
            parent[current] = best
    trusted = [False] * count
    index = int(length.argmax())
    while index != -1:
        trusted[index] = True
        index = int(parent[index])
    return trusted


def _fill_block(left: float | None, right: float | None, count: int) -> list[float]:
    """Replacements for ``count`` untrusted times between trusted ``left`` and ``right`` (None: no neighbour)."""
    if left is None or right is None:
        edge = left if right is None else right
        assert edge is not None  # the trusted chain is never empty
        return [edge] * count
    if count <= 2:
        # Position k of the block (1-based) is k from the left neighbour and count + 1 - k from the right.
        return [left if k <= count + 1 - k else right for k in range(1, count + 1)]
    step = (right - left) / (count + 1)
    return [left + step * k for k in range(1, count + 1)]


def unit_times(units: Sequence[str], fixed_ms: Sequence[int]) -> list[tuple[str, float, float]]:
    """(unit, start, end) in seconds, rounded to the millisecond as ``decode_forced_alignment`` does.

    ``fixed_ms`` holds ``fix_timestamps``' two times per unit (start, end); any other count means
    the units are not the ones the aligner was given, and is an error.
    """
    if len(fixed_ms) != 2 * len(units):
        raise ValueError(f"expected 2 times per unit ({2 * len(units)}), got {len(fixed_ms)}")
    return [
        (unit, round(fixed_ms[2 * index] / 1000.0, 3), round(fixed_ms[2 * index + 1] / 1000.0, 3))
        for index, unit in enumerate(units)
    ]
