"""The forced aligner's text side against transformers' own functions, on generated inputs.

Units, the monotonic fix-up, the class-to-milliseconds product and the rounding to seconds must
equal transformers' Qwen3ASRProcessor bit for bit: they decide the word timestamps users see.
Japanese and Korean use optional segmenters (nagisa, soynlp); their parity tests skip without them
(fail under CI: tests/requires.py).
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.qwen3_asr.processing_qwen3_asr import (
    FORCED_ALIGNER_LANGUAGES,
    Qwen3ASRProcessor,
    _fix_timestamps,
)

from asrlive.engine._align_text import (
    _CJK_RANGES,
    ALIGNER_LANGUAGES,
    MissingSegmenter,
    UnsupportedLanguage,
    aligner_language,
    fix_timestamps,
    split_units,
    timestamp_ms,
    unit_times,
)

from .requires import absent_module, requires

PARITY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# nagisa runs a neural network per call (milliseconds): fewer examples.
SEGMENTER_PARITY = settings(PARITY, max_examples=60)
TIMESTAMP_TOKEN = 151705
needs_nagisa = requires(absent_module("nagisa", "asrlive[ja]"))
needs_soynlp = requires(absent_module("soynlp", "asrlive[ko]"))
SUPPORTED_MESSAGE = (
    "it supports: Cantonese (yue), Chinese (zh), English (en), French (fr), German (de), Italian (it), "
    "Japanese (ja), Korean (ko), Portuguese (pt), Russian (ru), Spanish (es)"
)


def reference_units(text: str, language: str | None) -> list[str]:
    # The method never reads self: called unbound, no tokenizer or feature extractor to build.
    return Qwen3ASRProcessor.split_words_for_alignment(None, text, language)


def reference_fix(values: list[float]) -> list[int]:
    return _fix_timestamps(np.asarray(values, dtype=np.float64))


# --- languages ------------------------------------------------------------------------------------


def test_aligner_languages_are_transformers():
    assert set(ALIGNER_LANGUAGES) == FORCED_ALIGNER_LANGUAGES
    assert list(ALIGNER_LANGUAGES) == sorted(ALIGNER_LANGUAGES)


@pytest.mark.parametrize(
    "given, name",
    [
        (None, None),
        ("", None),
        ("auto", None),
        (" Auto ", None),
        ("en", "English"),
        ("English", "English"),
        ("ENGLISH", "English"),
        ("yue", "Cantonese"),
        ("zh", "Chinese"),
        ("ja", "Japanese"),
        ("korean", "Korean"),
    ],
)
def test_aligner_language_names(given, name):
    assert aligner_language(given) == name


@pytest.mark.parametrize("given, name", [("ar", "Arabic"), ("Arabic", "Arabic"), ("FIL", "Filipino"), ("th", "Thai")])
def test_unsupported_language_lists_the_supported_ones(given, name):
    with pytest.raises(UnsupportedLanguage) as raised:
        aligner_language(given)
    assert str(raised.value) == f"the forced aligner does not support {name}; {SUPPORTED_MESSAGE}"
    assert isinstance(raised.value, ValueError)
    assert raised.value.language == name


def test_unknown_language_is_not_an_aligner_question():
    with pytest.raises(ValueError, match="unknown language 'Klingon'") as raised:
        aligner_language("Klingon")
    assert not isinstance(raised.value, UnsupportedLanguage)


# --- units ----------------------------------------------------------------------------------------

WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
CJK_EDGES = [chr(code) for low, high in _CJK_RANGES for code in (low - 1, low, low + 1, high - 1, high, high + 1)]
MIXED_CHARACTERS = (
    "abcXYZ019'’`\".,!?;:-()[]%&@#*/\\_~…、。，！？「」『』・ー〜"  # Latin, digits, apostrophes, punctuation
    "あいうアイウｱｲｳ한국어ㄱㅏ"  # kana (full and half width), Hangul syllables and jamo
    "éñßøΩжД٣½Ⅻ²"  # accented and other scripts, other digits and numbers
    "\u0301\u0e31\u200b\u200c\u200d\ufe0f\ufeff\u00ad"  # combining marks, zero-width and format characters
    "😀👍🏽❤🇯🇵"  # emoji, skin tone, flags
    "\U0002ceb0\U00030000\U00031350"  # ideographs outside the ranges timed one by one (Ext F, G, H)
    "\ufa6e\ufada\U0002b73a\U0002cea2"  # unassigned code points inside those ranges
)
SPECIAL = [*MIXED_CHARACTERS, *WHITESPACE, *CJK_EDGES]
TEXT = st.text(
    st.one_of(
        st.sampled_from(SPECIAL),
        st.characters(min_codepoint=0x3000, max_codepoint=0x9FFF),  # kana, CJK symbols, ideographs
        st.characters(min_codepoint=0x20000, max_codepoint=0x2FA1F),  # extension and compatibility blocks
        st.characters(codec="utf-8"),  # anything
    ),
    max_size=60,
)
DEFAULT_LANGUAGES = [None] + [name for name in ALIGNER_LANGUAGES if name not in ("Japanese", "Korean")]


@PARITY
@given(text=TEXT, language=st.sampled_from(DEFAULT_LANGUAGES))
def test_units_match_transformers(text, language):
    assert split_units(text, language) == reference_units(text, language)


@pytest.mark.parametrize(
    "text, units",
    [
        ("Hello, world! It's 2024.", ["Hello", "world", "It's", "2024"]),
        ("我爱Python编程。", ["我", "爱", "Python", "编", "程"]),
        ("e.g. rock'n'roll — don’t", ["eg", "rock'n'roll", "dont"]),  # punctuation inside a word joins it
        ("\u3000 丽\U0002f800x\u00a0\U0002ceb0y ", ["丽", "\U0002f800", "x", "\U0002ceb0y"]),
        ("...  !!", []),
        ("", []),
    ],
)
def test_units_examples(text, units):
    assert split_units(text, "English") == units == reference_units(text, "English")


@pytest.mark.parametrize("language", ["ja", "english", "Arabic", ""])
def test_units_take_an_aligner_name(language):
    with pytest.raises(ValueError, match="expected an aligner language name"):
        split_units("text", language)


JAPANESE = st.text(
    st.one_of(
        st.sampled_from(SPECIAL),
        st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),  # kana
        st.sampled_from("日本語東京大学学生行来見今天気私"),
    ),
    max_size=40,
)
KOREAN = st.text(
    st.one_of(st.sampled_from(SPECIAL), st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3)),
    max_size=40,
)


@needs_nagisa
@SEGMENTER_PARITY
@given(text=JAPANESE)
def test_japanese_units_match_transformers(text):
    assert split_units(text, "Japanese") == reference_units(text, "Japanese")


@needs_soynlp
@SEGMENTER_PARITY
@given(text=KOREAN)
def test_korean_units_match_transformers(text):
    assert split_units(text, "Korean") == reference_units(text, "Korean")


@needs_soynlp
@PARITY
@given(text=KOREAN)
def test_soynlp_without_scores_splits_on_whitespace(text):
    from soynlp.tokenizer import LTokenizer

    assert LTokenizer().tokenize(text) == text.split()


@needs_nagisa
def test_japanese_example():
    assert split_units(" 東京タワーに行きました。", "Japanese") == ["東京", "タワー", "に", "行き", "まし", "た"]


@needs_soynlp
def test_korean_example():
    # Without word scores, soynlp keeps each space-delimited word whole.
    assert split_units("안녕하세요, 저는 학생입니다!", "Korean") == ["안녕하세요", "저는", "학생입니다"]


@pytest.mark.parametrize(
    "language, hidden, message",
    [
        ("Japanese", ["nagisa"], "Japanese word timestamps need the nagisa package: pip install 'asrlive[ja]'"),
        (
            "Korean",
            ["soynlp", "soynlp.tokenizer"],
            "Korean word timestamps need the soynlp package: pip install 'asrlive[ko]'",
        ),
    ],
)
def test_missing_segmenter_says_which_extra(monkeypatch, language, hidden, message):
    for module in hidden:  # None in sys.modules: the import fails as for a package not installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingSegmenter) as raised:
        split_units("text", language)
    assert str(raised.value) == message
    assert isinstance(raised.value, ImportError)
    assert split_units("still fine", "English") == ["still", "fine"]


def test_broken_segmenter_says_why(monkeypatch, tmp_path):
    # A nagisa that is installed but cannot load (its DyNet library missing, say).
    (tmp_path / "nagisa.py").write_text("import _asrlive_no_such_dependency\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "nagisa", raising=False)
    with pytest.raises(MissingSegmenter) as raised:
        split_units("text", "Japanese")
    assert str(raised.value) == (
        "Japanese word timestamps need the nagisa package: pip install 'asrlive[ja]' "
        "(importing nagisa failed: No module named '_asrlive_no_such_dependency')"
    )


# --- timestamps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, fixed",
    [
        ([0, 80, 80, 160], [0, 80, 80, 160]),  # in order: untouched
        ([0, 80, 40, 160], [0, 80, 80, 160]),  # one outlier: snapped to the left
        ([0, 100, 50, 40, 200], [0, 100, 100, 200, 200]),  # two: the first to the left, the second to the right
        ([0, 900, 800, 700, 10, 200], [0, 2, 5, 7, 10, 200]),  # three or more: interpolated (2.5, 5, 7.5 cut)
        ([0, 100, 900, 950, 990, 200, 300, 400, 500], [0, 100, 125, 150, 175, 200, 300, 400, 500]),
        ([500, 600, 0, 100, 200], [0, 0, 0, 100, 200]),  # short block at the start: the right neighbour
        ([700, 800, 900, 0, 100, 200, 300], [0, 0, 0, 0, 100, 200, 300]),  # long block at the start
        ([0, 300, 100], [0, 300, 300]),  # short block at the end: the left neighbour
        # Two longest chains (0 100 900 950 990 and 0 100 200 300 400): the one ending first wins,
        # and the long block after it copies its last value.
        ([0, 100, 900, 950, 990, 200, 300, 400], [0, 100, 900, 950, 990, 990, 990, 990]),
        ([79.9, 80.5, -0.5], [79, 80, 80]),  # whole milliseconds, cut toward zero
        ([42.0], [42]),
        ([], []),
    ],
)
def test_fix_timestamps_cases(values, fixed):
    assert fix_timestamps(values) == fixed
    if values:  # transformers fails on no values (max() of an empty list)
        assert reference_fix(values) == fixed


def ascending_with_jumps(steps: list[int]) -> list[float]:
    """Times that mostly rise, with drops and leaps: the outliers the aligner produces."""
    return [float(total * 80) for total in np.cumsum(steps)] if steps else []


VALUES = st.one_of(
    st.lists(st.sampled_from([0.0, 80.0, 160.0, 240.0]), max_size=200),  # ties everywhere
    st.lists(st.integers(-4, 6), max_size=200).map(ascending_with_jumps),
    st.lists(st.integers(-1, 2), max_size=200).map(ascending_with_jumps),
    st.lists(st.floats(-1e4, 1e6, width=32), max_size=200),  # fractions and negatives
)


@PARITY
@given(values=VALUES)
def test_fix_timestamps_matches_transformers(values):
    fixed = fix_timestamps(values)
    assert fixed == (reference_fix(values) if values else [])
    assert all(type(value) is int for value in fixed)


def outcome(function, values):
    try:
        return function(values)
    except (ValueError, OverflowError) as error:
        return type(error)


@settings(max_examples=100, deadline=None, database=None)
@given(values=st.lists(st.sampled_from([0.0, 80.0, 160.0, math.nan, math.inf, -math.inf]), min_size=1, max_size=12))
def test_fix_timestamps_nan_and_inf_like_transformers(values):
    # NaN chains with nothing; a NaN or infinity left in the result fails int() in both.
    assert outcome(fix_timestamps, values) == outcome(reference_fix, values)


def test_fix_timestamps_long_input_matches_transformers():
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.integers(0, 3, 3000)) * np.float32(80)
    times[rng.integers(0, 3000, 300)] = rng.integers(0, 3000, 300) * 80
    values = times.astype(np.float32)
    assert fix_timestamps(values.tolist()) == _fix_timestamps(values)


@PARITY
@given(
    classes=st.lists(st.one_of(st.integers(0, 5000), st.integers(0, 2**26)), max_size=50),
    segment_ms=st.one_of(st.just(80.0), st.sampled_from([33.3, 12.5, 1 / 3]), st.floats(0.001, 1000.0)),
)
def test_timestamp_ms_is_the_float32_product(classes, segment_ms):
    expected = (torch.tensor(classes, dtype=torch.long).float() * segment_ms).numpy().tolist()
    got = timestamp_ms(classes, segment_ms)
    assert got == expected
    assert all(type(value) is float for value in got)


def reference_decode(units: list[str], classes: list[int], segment_ms: float) -> list[tuple[str, float, float]]:
    """transformers' decode_forced_alignment on logits that predict ``classes`` at the timestamp tokens."""
    ids, positions = [1, 2, 3], []
    for _ in units:
        ids.append(7)
        positions += [len(ids), len(ids) + 1]
        ids += [TIMESTAMP_TOKEN, TIMESTAMP_TOKEN]
    logits = torch.zeros(1, len(ids), max(classes) + 1)
    logits[0, positions, classes] = 1.0
    decoded = Qwen3ASRProcessor.decode_forced_alignment(
        None, logits, torch.tensor([ids]), [units], TIMESTAMP_TOKEN, segment_ms
    )[0]
    return [(item["text"], item["start_time"], item["end_time"]) for item in decoded]


@PARITY
@given(
    data=st.data(),
    units=st.lists(st.text("abc你好", min_size=1, max_size=3), min_size=1, max_size=40),
    segment_ms=st.one_of(st.just(80.0), st.floats(0.5, 200.0)),
)
def test_unit_times_match_decode_forced_alignment(data, units, segment_ms):
    count = 2 * len(units)
    classes = data.draw(st.lists(st.one_of(st.integers(0, 60), st.integers(0, 4000)), min_size=count, max_size=count))
    got = unit_times(units, fix_timestamps(timestamp_ms(classes, segment_ms)))
    assert got == reference_decode(units, classes, segment_ms)


def test_unit_times_examples():
    assert unit_times(["a", "b"], [0, 1234, 1235, 99999]) == [("a", 0.0, 1.234), ("b", 1.235, 99.999)]
    assert unit_times([], fix_timestamps(timestamp_ms([], 80.0))) == []  # transformers fails here
    with pytest.raises(ValueError, match=re.escape("expected 2 times per unit (4), got 3")):
        unit_times(["a", "b"], [0, 1, 2])
