"""Subtitle cues a reader can follow: two lines of 42 columns and 7 seconds at most, cut between
words (between characters in Chinese and Japanese), the line's time shared out by text length,
and every character of the text kept, in order. The same writer serves `asrlive mic` and
`asrlive transcribe`."""

from __future__ import annotations

import io
import random

import pytest
import srt
import webvtt

from asrlive.clients._transcript import (
    Cue,
    CueLimits,
    Line,
    Transcript,
    TranscriptWriter,
    display_width,
    split_cues,
    timestamp,
)

LIMITS = CueLimits()
TWO_CITIES = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair."
)
CHINESE = (
    "今天天气很好，我们去公园散步吧。然后一起吃午饭，下午再去图书馆看书，晚上回家做饭。"
    "明天我们还要早起去上班，所以今晚要早点睡觉。"
)
JAPANESE = "今日はいい天気ですね。公園を散歩しましょう。それから一緒に昼ご飯を食べて、午後は図書館で本を読みます。"
MIXED = "我们用 Python 写一个 ASR demo，效果 very good！下一步是把 streaming 的延迟降到 300 毫秒以内。"


def _assert_readable(cues: list[Cue], text: str, start: float, end: float, limits: CueLimits = LIMITS) -> None:
    assert cues, "no cue for a line with text"
    for cue in cues:
        assert 1 <= len(cue.lines) <= limits.max_lines
        assert all(0 < display_width(line) <= limits.line_columns for line in cue.lines), cue.lines
        assert all(line == line.strip() for line in cue.lines)
        assert cue.end - cue.start <= limits.max_seconds + 1e-9
        assert start - 1e-9 <= cue.start <= cue.end <= end + 1e-9
    # Order kept, and consecutive: each cue starts where the one before ended, unless that one was
    # a single word cut short at the time limit.
    assert cues[0].start == start
    for a, b in zip(cues, cues[1:], strict=False):
        assert a.end == b.start or (a.end < b.start and a.end - a.start == pytest.approx(limits.max_seconds))
    # Nothing lost or added: the characters, in order, are the line's.
    assert "".join("".join(cue.lines) for cue in cues).replace(" ", "") == "".join(text.split())


def test_a_short_line_is_one_cue_as_it_is():
    assert split_cues("  go forward   ten meters ", 1.5, 3.25) == [Cue(1.5, 3.25, ("go forward ten meters",))]


def test_english_is_cut_between_words_into_even_cues():
    cues = split_cues(TWO_CITIES, 0.9, 20.9)
    _assert_readable(cues, TWO_CITIES, 0.9, 20.9)
    assert cues[-1].end == 20.9
    # The words joined back with the spaces the cuts took are the text.
    assert " ".join(" ".join(cue.lines) for cue in cues) == TWO_CITIES
    # As few cues as the limits allow (283 columns in cues of at most 84), none a scrap.
    assert len(cues) == 4
    widths = [sum(display_width(line) for line in cue.lines) for cue in cues]
    assert min(widths) > max(widths) / 2


def test_cues_end_at_a_sentence_rather_than_at_the_middle():
    first = "The first sentence here is short."
    second = "Then comes a second one that goes on for a good while longer than that."
    cues = split_cues(f"{first} {second}", 0.0, 6.0)  # 106 columns: two cues; even ones would cut "comes"
    assert [" ".join(cue.lines) for cue in cues] == [first, second]


def test_time_is_shared_in_proportion_to_the_text():
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    cues = split_cues(text, 10.0, 30.0)  # 20 s for 81 letters: a 7 s cue holds at most 28 of them
    _assert_readable(cues, text, 10.0, 30.0)
    assert len(cues) == 4  # 27 + 24 + 14 + 16 letters: three cues cannot hold the words
    total = display_width(text.replace(" ", ""))
    for cue in cues:
        share = display_width("".join(cue.lines).replace(" ", "")) / total
        assert cue.end - cue.start == pytest.approx(20.0 * share)


@pytest.mark.parametrize("text", [CHINESE, JAPANESE, MIXED], ids=["chinese", "japanese", "mixed"])
def test_cjk_is_cut_between_characters_and_measured_in_columns(text):
    cues = split_cues(text, 0.0, 8.0)  # short enough that only the lines limit the cues
    _assert_readable(cues, text, 0.0, 8.0)
    assert len(cues) > 1
    lines = [line for cue in cues for line in cue.lines]
    assert all(len(line) <= 21 or not any("\u4e00" <= c <= "\u9fff" for c in line) for line in lines)
    # No line starts with closing punctuation (kinsoku), and spaces survive only between words.
    assert not any(line[0] in "，。、！？）」" for line in lines)
    if text is not MIXED:
        assert " " not in "".join(lines)


def test_chinese_lines_hold_21_characters_and_cuts_follow_punctuation():
    assert [cue.lines for cue in split_cues(CHINESE, 0.0, 8.0)] == [
        ("今天天气很好，我们去公园散步吧。", "然后一起吃午饭，下午再去图书馆看书，"),
        ("晚上回家做饭。明天我们还要早起", "去上班，所以今晚要早点睡觉。"),
    ]
    assert [cue.lines[-1][-1] for cue in split_cues(CHINESE, 0.0, 12.0)] == ["，", "。"]


def test_a_word_longer_than_a_line_is_cut_and_kept():
    url = "https://example.com/" + "a" * 90
    cues = split_cues(f"see {url} now", 0.0, 5.0)
    _assert_readable(cues, f"see {url} now", 0.0, 5.0)


def test_a_long_pause_around_one_word_shows_it_for_seven_seconds_at_most():
    assert split_cues("Yes.", 3.0, 25.0) == [Cue(3.0, 10.0, ("Yes.",))]


def test_random_texts_keep_every_character_within_the_limits():
    rng = random.Random(7)
    words = ["a", "I", "the", "transcription", "incomprehensibilities", "ok,", "yes.", "数据", "東京", "naïve", "😀"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 120)))
        start = rng.uniform(0, 100)
        end = start + rng.uniform(0, 60)
        limits = CueLimits(line_columns=rng.choice([16, 32, 42]), max_lines=rng.choice([1, 2, 3]))
        cues = split_cues(text, start, end, limits)
        for cue in cues:  # single words may exceed the time of a cue only by being capped
            assert cue.end - cue.start <= limits.max_seconds + 1e-9
        _assert_readable(cues, text, start, end, limits)


def test_empty_and_blank_lines_make_no_cue():
    assert split_cues("", 0.0, 1.0) == [] and split_cues(" \n\t ", 0.0, 1.0) == []


# --- the files ---------------------------------------------------------------------------------


def _lines() -> list[Line]:
    return [
        Line(0.5, 2.0, "go forward ten meters", "English", (1, 2)),
        Line(2.0, 2.5, "   ", None, ()),  # nothing said: no cue, but a jsonl record
        Line(3.0, 23.0, TWO_CITIES, "English", (3,)),
        Line(24.0, 36.0, CHINESE, "Chinese", (4, 5)),
        Line(37.0, 38.0, "a < b & c --> d", "English", (6,)),
    ]


def test_srt_and_vtt_parse_and_hold_the_split_cues(tmp_path):
    transcript = Transcript(_lines())
    for suffix in (".srt", ".vtt"):
        transcript.write(tmp_path / f"out{suffix}")
    expected = [cue for line in _lines() for cue in split_cues(line.text, line.start, line.end)]
    subtitles = list(srt.parse((tmp_path / "out.srt").read_text(encoding="utf-8")))
    assert [s.index for s in subtitles] == list(range(1, len(expected) + 1))
    assert [s.content.split("\n") for s in subtitles] == [list(cue.lines) for cue in expected]
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subtitles] == [
        (round(cue.start, 3), round(cue.end, 3)) for cue in expected
    ]
    captions = webvtt.read(str(tmp_path / "out.vtt"))
    assert [(c.start, c.end) for c in captions] == [(timestamp(c.start, "."), timestamp(c.end, ".")) for c in expected]
    assert [c.lines for c in captions[:-1]] == [list(cue.lines) for cue in expected[:-1]]
    # WebVTT cue text is markup: < and & are escaped, and "-->" could not appear at all.
    assert captions[-1].raw_text == "a &lt; b &amp; c --&gt; d"


def test_appending_writes_what_the_whole_transcript_renders():
    """`asrlive transcribe` appends piece by piece, `asrlive mic` rewrites: the same bytes."""
    for suffix in (".txt", ".srt", ".vtt", ".jsonl"):
        out = io.StringIO()
        writer = TranscriptWriter(out, suffix)
        for line in _lines():
            writer.add(line)
        assert out.getvalue() == Transcript(_lines()).render(suffix)


def test_txt_has_one_line_per_spoken_line():
    assert Transcript(_lines()).txt().splitlines() == [
        " ".join(line.text.split()) for line in _lines() if line.text.strip()
    ]


def test_unknown_suffix_is_refused():
    with pytest.raises(ValueError, match="unknown transcript format '.doc'"):
        Transcript(_lines()).render(".doc")
