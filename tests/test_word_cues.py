"""Subtitles cut at word times: when a final carries the aligner's words, each cue runs from its
first word's start to its last word's end, the cuts fall where the speaker paused, and a .vtt
cue marks where each of its words starts (karaoke); words that do not spell the text are ignored,
and lines without words are written as they always were."""

from __future__ import annotations

import io
import json
import math
import re
import unicodedata

import srt
import webvtt
from hypothesis import given, settings
from hypothesis import strategies as st

from asrlive._words import Word
from asrlive.clients._transcript import Cue, CueLimits, Line, Transcript, TranscriptWriter, split_cues

MIXED = "我们用 Python 写一个 ASR demo，效果 very good！下一步是把 streaming 的延迟降到 300 毫秒以内。"
LIMITS = CueLimits()
TAG = re.compile(r"<(\d\d):(\d\d):(\d\d)\.(\d\d\d)>")


def _units(text: str) -> list[str]:
    """The aligner's units of a text: its letters, digits and apostrophes, split at whitespace,
    every CJK ideograph on its own."""
    units = []
    for word in text.split():
        current = ""
        for char in word:
            if char != "'" and unicodedata.category(char)[0] not in "LN":
                continue
            if "\u4e00" <= char <= "\u9fff":
                units += [current, char] if current else [char]
                current = ""
            else:
                current += char
        units += [current] if current else []
    return units


def _timed(units: list[str], start: float = 1.0, step: float = 0.5) -> tuple[Word, ...]:
    """The units one after another, each ``step`` seconds after the one before, 0.1 s apart."""
    return tuple(
        Word(unit, round(start + n * step, 3), round(start + (n + 1) * step - 0.1, 3)) for n, unit in enumerate(units)
    )


def _render(lines: list[Line], suffix: str, limits: CueLimits = LIMITS) -> str:
    return Transcript(lines, limits).render(suffix)


def _seconds(hours: str, minutes: str, secs: str, millis: str) -> int:
    return ((int(hours) * 60 + int(minutes)) * 60 + int(secs)) * 1000 + int(millis)


def _vtt_cues(vtt: str) -> list[tuple[int, int, str]]:
    """(start ms, end ms, raw text) of each cue of a .vtt as written."""
    assert vtt.startswith("WEBVTT\n\n") and vtt.endswith("\n\n")
    cues = []
    for block in vtt[len("WEBVTT\n\n") : -2].split("\n\n"):
        timing, text = block.split("\n", 1)
        start, end = (
            _seconds(*re.fullmatch(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)", t).groups()) for t in timing.split(" --> ")
        )
        cues.append((start, end, text))
    return cues


def _assert_karaoke(vtt: str) -> int:
    """Every cue timestamp tag lies strictly inside its cue, each later than the one before (the
    WebVTT rules); returns how many there are."""
    tags = 0
    for start, end, text in _vtt_cues(vtt):
        times = [_seconds(*match) for match in TAG.findall(text)]
        assert not times or all(a < b for a, b in zip([start, *times], [*times, end], strict=True)), (start, text)
        tags += len(times)
    return tags


def _assert_rejoins(cues: list[Cue], caption: str) -> None:
    """The cues' lines, joined by the spaces the cuts took (none between CJK characters), are the caption."""
    at = 0
    for line in (line for cue in cues for line in cue.lines):
        at += 1 if at and caption[at] == " " else 0
        assert caption.startswith(line, at), (line, caption[at:])
        at += len(line)
    assert at == len(caption)


# --- cue boundaries ----------------------------------------------------------------------------


def test_a_pause_cuts_the_line_where_the_speaker_stopped():
    text = "I was going to say that we should leave before the rain starts"
    words = list(_timed(text.split(), start=1.0, step=0.4))
    words[5:] = [Word(w.text, round(w.start + 7.0, 3), round(w.end + 7.0, 3)) for w in words[5:]]  # 7 s silence
    line = Line(0.5, 15.0, text, "English", (1,), tuple(words))
    assert _render([line], ".srt") == (
        "1\n00:00:01,000 --> 00:00:02,900\nI was going to say\n\n"
        "2\n00:00:10,000 --> 00:00:13,100\nthat we should leave\nbefore the rain starts\n\n"
    )
    # Without the words the time is shared out by text, and the cuts fall elsewhere.
    shared = split_cues(text, 0.5, 15.0)
    assert [c.lines for c in shared] != [c.lines for c in split_cues(text, 0.5, 15.0, words=words)]
    assert shared[0].start == 0.5 and shared[-1].end == 15.0


def test_the_time_limit_counts_real_seconds():
    """A short text spoken with a pause is cut at the pause, however few columns it takes."""
    text = "one two three four"
    words = (Word("one", 0.0, 0.5), Word("two", 7.6, 8.0), Word("three", 8.1, 8.6), Word("four", 8.7, 9.2))
    # Shared out by text, "one two" would be a 3.7 s cue; it takes 8 s to say.
    assert [c.lines for c in split_cues(text, 0.0, 9.2)] == [("one two",), ("three four",)]
    cues = split_cues(text, 0.0, 9.2, words=words)
    assert [(c.start, c.end, c.lines) for c in cues] == [(0.0, 0.5, ("one",)), (7.6, 9.2, ("two three four",))]
    # Spoken without the pause, the same line is one cue, from its first word to its last.
    quick = (words[0], *(Word(w.text, round(w.start - 7, 3), round(w.end - 7, 3)) for w in words[1:]))
    assert [(c.start, c.end, c.lines) for c in split_cues(text, 0.0, 9.2, words=quick)] == [(0.0, 2.2, (text,))]


def test_chinese_mixed_with_latin_is_timed_unit_by_unit():
    units = _units(MIXED)
    assert units[:5] == ["我", "们", "用", "Python", "写"] and "300" in units and "streaming" in units
    words = _timed(units)
    cues = split_cues(MIXED, 0.0, 20.0, words=words)
    assert len(cues) > 1
    _assert_rejoins(cues, MIXED)
    first = 0
    for cue in cues:  # each cue: from its first unit's start to its last unit's end
        count = len(_units("\n".join(cue.lines)))
        assert (cue.start, cue.end) == (words[first].start, words[first + count - 1].end)
        first += count
    assert first == len(words)


def test_a_unit_over_several_characters_shares_its_time_among_them():
    """Japanese units are the segmenter's words: a cut inside one splits its time evenly."""
    words = (Word("今日", 0.0, 1.0), Word("は", 1.0, 1.5), Word("天気", 2.0, 3.0))
    line = Line(0.0, 4.0, "今日は天気", "Japanese", (1,), words)
    assert _render([line], ".srt", CueLimits(line_columns=4, max_lines=1)) == (
        "1\n00:00:00,000 --> 00:00:00,500\n今\n\n"
        "2\n00:00:00,500 --> 00:00:01,500\n日は\n\n"
        "3\n00:00:02,000 --> 00:00:03,000\n天気\n\n"
    )


def test_punctuation_on_its_own_goes_with_the_words_around_it():
    words = (Word("Well", 1.0, 1.5), Word("I", 3.0, 3.2), Word("mean", 3.2, 3.6), Word("yes", 6.0, 6.4))
    line = Line(0.0, 7.0, "Well — I mean … yes.", "English", (1,), words)
    assert _render([line], ".vtt", CueLimits(line_columns=6, max_lines=1)) == (
        "WEBVTT\n\n"
        "00:00:01.000 --> 00:00:01.500\nWell —\n\n"
        "00:00:03.000 --> 00:00:03.600\nI <00:00:03.200>mean\n\n"
        "00:00:06.000 --> 00:00:06.400\n… yes.\n\n"  # the ellipsis comes with "yes"
    )
    # A long pause at an ellipsis does not strand it: it ends the words before it.
    words = (Word("Yes", 2.0, 2.5), Word("no", 20.0, 20.5))
    assert [(c.start, c.end, c.lines) for c in split_cues("— Yes … no", 0.0, 21.0, words=words)] == [
        (2.0, 2.5, ("— Yes …",)),
        (20.0, 20.5, ("no",)),
    ]


def test_cues_keep_the_caption_text_and_escape_it_in_vtt():
    text = "a < b && c --> d, isn't it?"
    line = Line(0.0, 3.0, text, "English", (1,), _timed(_units(text), start=0.0, step=0.3))
    assert _units(text) == ["a", "b", "c", "d", "isn't", "it"]
    assert _render([line], ".srt") == f"1\n00:00:00,000 --> 00:00:01,700\n{text}\n\n"
    assert _render([line], ".vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.700\n"
        "a <00:00:00.300>&lt; b <00:00:00.600>&amp;&amp; c <00:00:00.900>--&gt; d, "
        "<00:00:01.200>isn't <00:00:01.500>it?\n\n"
    )


# --- karaoke -----------------------------------------------------------------------------------


def test_karaoke_tags_increase_inside_their_cue():
    # "b" and "c" start on the same millisecond: one tag; "d" starts with the cue's end: none.
    words = (Word("a", 1.0, 1.2), Word("b", 1.5, 1.5), Word("c", 1.5, 2.0), Word("d", 2.0, 2.0))
    vtt = _render([Line(0.0, 3.0, "a b c d", "English", (1,), words)], ".vtt")
    assert vtt == "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\na <00:00:01.500>b c d\n\n"
    assert _assert_karaoke(vtt) == 1
    # SubRip has no such tags.
    assert "<" not in _render([Line(0.0, 3.0, "a b c d", "English", (1,), words)], ".srt")


def test_files_with_words_parse():
    lines = [
        Line(0.0, 1.0, "", None, (), ()),
        Line(0.5, 12.0, MIXED, "Chinese", (1,), _timed(_units(MIXED), start=0.5, step=0.35)),
        Line(
            12.0,
            30.0,
            "Right — so, where were we?",
            "English",
            (2,),
            _timed(["Right", "so", "where", "were", "we"], 20),
        ),
        Line(30.0, 31.0, "no words here", "English", (3,)),
    ]
    cues = [cue for line in lines for cue in split_cues(line.text, line.start, line.end, words=line.words)]
    subtitles = list(srt.parse(_render(lines, ".srt")))
    assert [s.content.split("\n") for s in subtitles] == [list(cue.lines) for cue in cues]
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subtitles] == [
        (round(cue.start, 3), round(cue.end, 3)) for cue in cues
    ]
    vtt = _render(lines, ".vtt")
    captions = webvtt.from_string(vtt)
    assert [c.text.split("\n") for c in captions] == [list(cue.lines) for cue in cues]  # tags stripped
    assert _assert_karaoke(vtt) > 20
    assert [c.start_in_seconds for c in captions] == sorted(c.start_in_seconds for c in captions)


# --- fallback and old behaviour ----------------------------------------------------------------


def test_words_that_do_not_spell_the_text_are_ignored():
    text = "Hello, world! 你好ABC — don't-stop."
    good = _timed(_units(text))
    assert [w.text for w in good] == ["Hello", "world", "你", "好", "ABC", "don'tstop"]
    plain = Line(0.5, 6.0, text, "English", (1,))
    wrong = [
        (),  # none at all
        good[:-1],  # one missing
        (*good, Word("extra", 9.0, 9.5)),  # one too many
        (Word("Hallo", 1.0, 1.4), *good[1:]),  # another word
        (Word("Hello", math.nan, 1.4), *good[1:]),  # no time
        (Word("Hello", 1.0, math.inf), *good[1:]),
        (good[1], good[0], *good[2:]),  # out of order
    ]
    for words in wrong:
        for suffix in (".srt", ".vtt"):
            assert _render([Line(0.5, 6.0, text, "English", (1,), words)], suffix) == _render([plain], suffix)
    # Units cut elsewhere but spelling the text are still its times.
    regrouped = (Word("Hel", 1.0, 1.2), Word("loworld你", 1.3, 2.0), *good[3:])
    assert split_cues(text, 0.5, 6.0, words=regrouped)[0].start == 1.0


def test_times_that_run_back_are_held_up():
    """A word cannot start before the one before it ends: cues stay in order whatever a client sent."""
    words = (Word("one", 5.0, 6.0), Word("two", 2.0, 3.0), Word("three", 6.5, 6.0))
    cues = split_cues("one. two. three.", 0.0, 9.0, CueLimits(line_columns=6, max_lines=1), words)
    assert [(c.start, c.end, c.lines) for c in cues] == [
        (5.0, 6.0, ("one.",)),
        (6.0, 6.0, ("two.",)),
        (6.5, 6.5, ("three.",)),
    ]


def test_punctuation_only_text_with_no_words_is_shared_out():
    assert split_cues("— …", 1.0, 2.0, words=()) == split_cues("— …", 1.0, 2.0)


def test_lines_without_words_are_written_as_before():
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of folly."
    lines = [Line(0.5, 2.0, "go forward ten meters", "English", (1, 2)), Line(3.0, 13.0, text, "English", (3,))]
    # What the writer wrote before words existed.
    assert _render(lines, ".srt") == (
        "1\n00:00:00,500 --> 00:00:02,000\ngo forward ten meters\n\n"
        "2\n00:00:03,000 --> 00:00:08,125\nIt was the best of times,\nit was the worst of times,\n\n"
        "3\n00:00:08,125 --> 00:00:13,000\nit was the age of wisdom,\nit was the age of folly.\n\n"
    )
    assert _render(lines, ".vtt") == (
        "WEBVTT\n\n00:00:00.500 --> 00:00:02.000\ngo forward ten meters\n\n"
        "00:00:03.000 --> 00:00:08.125\nIt was the best of times,\nit was the worst of times,\n\n"
        "00:00:08.125 --> 00:00:13.000\nit was the age of wisdom,\nit was the age of folly.\n\n"
    )
    assert _render(lines, ".jsonl") == (
        '{"start": 0.5, "end": 2.0, "text": "go forward ten meters", "language": "English", "token_ids": [1, 2]}\n'
        f'{{"start": 3.0, "end": 13.0, "text": "{text}", "language": "English", "token_ids": [3]}}\n'
    )
    # A line with words next to them changes nothing about them.
    timed = Line(14.0, 16.0, "and then", "English", (4,), _timed(["and", "then"], 14.5))
    for suffix in (".srt", ".vtt", ".jsonl", ".txt"):
        assert _render([*lines, timed], suffix).startswith(_render(lines, suffix))
    assert _render([*lines, timed], ".txt") == _render([*lines, Line(14.0, 16.0, "and then", None, ())], ".txt")


# --- jsonl -------------------------------------------------------------------------------------


def test_jsonl_keeps_the_words_and_reads_them_back():
    finals = [
        {
            "start": 0.5,
            "end": 2.0,
            "text": "hi there",
            "language": "English",
            "token_ids": [1],
            "words": [{"text": "hi", "start": 0.6, "end": 0.9}, {"text": "there", "start": 1.0, "end": 1.7}],
        },
        {
            "start": 2.0,
            "end": 3.0,
            "text": "你好",
            "language": "Chinese",
            "token_ids": [2],
            "words": None,
            "words_error": "too long to align",
        },
        {"start": 3.0, "end": 4.0, "text": "plain", "language": "English", "token_ids": [3]},
        {"start": 4.0, "end": 4.5, "text": "", "language": None, "token_ids": [], "words": []},
    ]
    transcript = Transcript()
    for final in finals:
        transcript.add(final)
    assert [line.words for line in transcript.lines] == [
        (Word("hi", 0.6, 0.9), Word("there", 1.0, 1.7)),
        None,
        None,
        (),
    ]
    records = [json.loads(row) for row in transcript.jsonl().splitlines()]
    assert [record.get("words", "absent") for record in records] == [finals[0]["words"], "absent", "absent", []]
    assert [Line.from_final(record) for record in records] == transcript.lines
    # Appending writes the same bytes as rendering the whole.
    out = io.StringIO()
    writer = TranscriptWriter(out, ".jsonl")
    for line in transcript.lines:
        writer.add(line)
    assert out.getvalue() == transcript.jsonl()


# --- any words, any text -----------------------------------------------------------------------

_UNITS = st.one_of(
    st.sampled_from(
        ["hello", "don't", "ASR", "300", "naïve", "你", "好", "東", "京", "a", "I", "x'y", "incomprehensibly"]
    ),
    st.text(alphabet="abcXYZ09'éß", min_size=1, max_size=14),
)
_GLUE = st.sampled_from([" ", " ", " ", "", ", ", " — ", "-", "! ", "。", " … ", "「", "」 ", ". "])


@st.composite
def _timed_lines(draw: st.DrawFn) -> tuple[str, tuple[Word, ...]]:
    """A text built around random units, and the units with times as an aligner gives them: whole
    milliseconds, each word after the one before, now and then a long pause or a word of no length."""
    units = draw(st.lists(_UNITS, min_size=1, max_size=40))
    glue = draw(st.lists(_GLUE, min_size=len(units) + 1, max_size=len(units) + 1))
    text = glue[0].strip() + "".join(unit + between for unit, between in zip(units, glue[1:], strict=True))
    words, clock = [], draw(st.integers(0, 100_000))
    for unit in units:
        start = clock + draw(st.sampled_from([0, 0, 40, 80, 300, 2_000, 9_000]))
        clock = start + draw(st.sampled_from([0, 80, 160, 400, 1_200]))
        words.append(Word(unit, start / 1000, clock / 1000))
    return text, tuple(words)


@settings(max_examples=300, deadline=None)
@given(
    _timed_lines(),
    st.sampled_from([8, 16, 42]),
    st.sampled_from([1, 2]),
    st.sampled_from([1.5, 7.0]),
)
def test_any_timed_line_makes_ordered_cues_within_its_words(line, columns, max_lines, max_seconds):
    text, words = line
    limits = CueLimits(line_columns=columns, max_lines=max_lines, max_seconds=max_seconds)
    caption = " ".join(text.split())
    cues = split_cues(text, words[0].start - 1.0, words[-1].end + 1.0, limits, words)
    assert cues[0].start == words[0].start and cues[-1].end == words[-1].end  # timed by the words
    for cue in cues:
        assert words[0].start <= cue.start <= cue.end <= words[-1].end
        assert 1 <= len(cue.lines) <= max_lines
    for a, b in zip(cues, cues[1:], strict=False):
        assert a.start <= a.end <= b.start <= b.end
    _assert_rejoins(cues, caption)
    for cue in cues:
        offsets = [offset for offset, _ in cue.marks]
        assert offsets == sorted(set(offsets)) and all(0 < offset < len("\n".join(cue.lines)) for offset in offsets)
    assert [
        s.content.split("\n") for s in srt.parse(_render([Line(0.0, 0.0, text, None, (), words)], ".srt", limits))
    ] == [list(cue.lines) for cue in cues]
    vtt = _render([Line(0.0, 0.0, text, None, (), words)], ".vtt", limits)
    _assert_karaoke(vtt)
    assert [c.text.split("\n") for c in webvtt.from_string(vtt)] == [list(cue.lines) for cue in cues]
