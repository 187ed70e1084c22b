"""The live line in Chinese, Japanese and Korean: measured in terminal columns, never wrapped, never stacked.

A CJK character takes two columns; a live line that wraps cannot be redrawn in place (carriage return and
clear line reach only its last row), so every redraw would leave a copy above. These tests look at the
bytes a terminal receives and, where pyte is installed, at the screen a terminal emulator makes of them.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from wcwidth import wcswidth, wcwidth

from asrlive.clients._display import Captions

from .requires import import_required

CLEAR, DIM, RESET = "\r\x1b[2K", "\x1b[2m", "\x1b[0m"
HEAD = "▯▯▯▯▯▯▯▯ listening "  # no audio yet: an empty meter; 19 columns
CHINESE = "今天天气很好我们去公园散步吧然后一起吃午饭"
JAPANESE = "今日はいい天気ですね。公園を散歩しましょう。ｶﾀｶﾅとＡＢＣも"
KOREAN = "오늘은 날씨가 좋네요. 공원에 산책하러 갈까요?"
MIXED = "我们用 Python 写一个 ASR demo，效果 very good！"
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _terminal(width: int) -> tuple[Captions, io.StringIO]:
    out = io.StringIO()
    captions = Captions(out=out, err=io.StringIO(), live=True)
    captions.width = lambda: width  # type: ignore[method-assign]
    captions.on_event({"type": "status", "state": "listening", "offset": 0.0})
    return captions, out


def _partial(stable: str, unstable: str) -> dict:
    return {"type": "partial", "segment": 0, "text": stable + unstable, "stable": stable, "unstable": unstable}


def _final(text: str, start: float = 1.0) -> dict:
    return {"type": "final", "segment": 0, "text": text, "language": "Chinese", "start": start, "end": start + 1}


def _stream(captions: Captions, text: str) -> None:
    """The partials of text arriving a character at a time, the last three characters unstable."""
    for n in range(1, len(text) + 1):
        captions.on_event(_partial(text[: max(n - 3, 0)], text[max(n - 3, 0) : n]))


def _visible(written: str) -> str:
    """What the terminal prints of a redraw: without the sequences Captions itself writes."""
    return written.replace(CLEAR, "").replace(DIM, "").replace(RESET, "")


def _columns(text: str) -> int:
    """Columns on a terminal that joins characters (wcswidth) or on one that draws them one by one."""
    return max(wcswidth(text), sum(max(wcwidth(char), 0) for char in text))


def _live_lines(written: str) -> list[str]:
    """The redraws of the live line: every redraw but the committed lines (finals, notes end in a newline)."""
    return [_visible(line) for line in written.split(CLEAR) if line and not line.endswith("\n")]


@pytest.mark.parametrize("text", [CHINESE, JAPANESE, KOREAN, MIXED], ids=["zh", "ja", "ko", "zh+en"])
def test_every_redraw_of_a_partial_wider_than_the_terminal_fits_the_terminal(text):
    width = 30
    captions, out = _terminal(width)
    _stream(captions, text)
    lines = _live_lines(out.getvalue())
    assert len(lines) == len(text) + 1  # the status, then one redraw a partial
    for line in lines:
        assert _columns(line) <= width - 1, line  # the last column stays free: nothing wraps
    tail = lines[-1].removeprefix(HEAD).removeprefix("…")
    assert text.endswith(tail) and len(tail) < len(text)
    room = width - 1 - _columns(HEAD + "…")
    assert _columns(tail) <= room < _columns(text[-len(tail) - 1 :])  # as much of the end as fits


def test_the_cut_keeps_stable_text_plain_and_unstable_text_dim_and_splits_no_wide_character():
    captions, out = _terminal(30)  # 10 columns for the partial
    captions.on_event(_partial("今天天气很好我们去公园散步吧然后一起", "吃午饭"))
    # 9 columns: the ellipsis, 起 and the three unstable; 后 would make 11. One column stays empty.
    assert out.getvalue().endswith(f"{RESET}…起{DIM}吃午饭{RESET}")
    captions.on_event(_partial("今天", "天气很好我们去公园散步吧"))
    assert out.getvalue().endswith(f"{RESET}…{DIM}园散步吧{RESET}")  # only unstable text fits
    captions.on_event(_partial("今天", "天气"))
    assert out.getvalue().endswith(f"{DIM}{HEAD}{RESET}今天{DIM}天气{RESET}")  # fits whole: no ellipsis


def test_line_breaks_tabs_and_carriage_returns_in_a_partial_never_reach_the_terminal():
    captions, out = _terminal(80)
    captions.on_event(_partial("第一行\n第二行\t", "第三\r\n行 \x0b end"))
    written = out.getvalue()
    assert written.endswith(f"{DIM}{HEAD}{RESET}第一行 第二行 {DIM}第三 行 end{RESET}")
    assert "\n" not in written and written.count("\r") == written.count(CLEAR)


@pytest.mark.parametrize(
    "cluster",
    ["e\u0301", "\u1100\u1161\u11a8", "👨\u200d👩\u200d👧", "❤\ufe0f"],
    ids=["combining-accent", "hangul-jamo", "zwj-family", "vs16-heart"],
)
def test_a_cut_never_splits_a_character_from_its_combining_marks_or_joiners(cluster):
    width = 40
    captions, out = _terminal(width)
    captions.on_event(_partial("", cluster * 30))
    line = _live_lines(out.getvalue())[-1]
    assert _columns(line) <= width - 1
    tail = line.removeprefix(HEAD).removeprefix("…")
    assert tail and tail == cluster * (len(tail) // len(cluster))  # whole clusters only


def test_a_terminal_narrower_than_the_head_gets_the_head_cut_too():
    captions, out = _terminal(13)
    captions.on_event(_partial("今天", "天气"))
    assert _live_lines(out.getvalue())[-1] == "▯▯▯▯▯▯▯▯ lis"  # 12 columns
    captions.on_event({"type": "status", "state": "聆听中" * 10, "offset": 0.0})  # a state in wide characters
    assert _live_lines(out.getvalue())[-1] == "▯▯▯▯▯▯▯▯ 聆…"  # 听 would make 13 columns; the partial: cut


HOSTILE = [
    {"type": "status", "state": "listening\x1b[2J", "offset": 0.0},  # clear the screen
    _partial("你好\x1b[2J\x1b[H", "\x1b]0;pwned\x07世界\x9b31m\x07"),  # home, window title, C1 CSI, bell
    {**_final("\x1b[31m红色\x1b[0m的字\x1bc\u202e"), "language": "中文\x1b[5m"},  # colour, reset, RTL override
    {"type": "error", "code": "bad\x1b[1A", "message": "x\x1b]52;c;ZXZpbA==\x07y\r\nz"},  # clipboard write
    _partial("\ud800", ""),  # a lone surrogate: JSON allows it, UTF-8 cannot encode it
]


def test_escape_sequences_and_control_characters_from_the_server_never_reach_a_terminal():
    captions, out = _terminal(80)
    for event in HOSTILE:
        captions.on_event({**event, "token_ids": [1]})
    written = out.getvalue()
    assert not CONTROL.search(_visible(written).replace("\n", ""))
    assert all("\n" not in line[:-1] for line in written.split(CLEAR))  # a newline only ends a committed line
    assert "pwned" not in written and "ZXZpbA" not in written  # string commands are dropped whole
    assert f"{DIM}[00:01]{RESET} 红色的字\n" in written  # the final has only its text
    assert f"{RESET}你好{DIM}世界 {RESET}" in written  # the bell: a space
    assert f"{DIM}-- server: bad: xy z{RESET}\n" in written
    assert written.endswith(f"{DIM}{HEAD.replace('listening', 'listening 中文')}{RESET}\ufffd{DIM}{RESET}")
    written.encode("utf-8")  # would raise on the surrogate


def test_escape_sequences_from_the_server_never_reach_a_pipe_or_stderr():
    out, err = io.StringIO(), io.StringIO()
    captions = Captions(out=out, err=err, live=False)
    for event in HOSTILE:
        captions.on_event({**event, "token_ids": [1]})
    assert out.getvalue() == "红色的字\n"
    assert err.getvalue() == "asrlive: server: bad: xy z\n"


def _screen(written: str, width: int, height: int):
    pyte = import_required("pyte", "asrlive[test]")
    screen = pyte.Screen(width, height)
    pyte.Stream(screen).feed(written)
    return screen


def test_a_terminal_emulator_shows_the_finals_and_one_live_line_not_stacked_copies():
    captions, out = _terminal(40)
    captions.on_audio(np.full(1600, 0.1, np.float32))
    _stream(captions, CHINESE)
    captions.on_event({**_final(CHINESE, start=3.0), "token_ids": [1]})  # a final may wrap: it is not redrawn
    _stream(captions, JAPANESE)
    captions.on_event({**_final(JAPANESE, start=65.0), "token_ids": [1]})
    _stream(captions, KOREAN.replace(" ", "\n"))  # line breaks in every partial
    screen = _screen(out.getvalue(), 40, 8)
    rows = [row.rstrip() for row in screen.display]  # a wide character's second cell reads as ""
    # Counting characters, the old line wrapped the Korean partial and left three stacked copies.
    assert rows == [
        "[00:03] 今天天气很好我们去公园散步吧然后",
        "一起吃午饭",
        "[01:05] 今日はいい天気ですね。公園を散歩",
        "しましょう。ｶﾀｶﾅとＡＢＣも",
        "▮▮▮▮▮▯▯▯ listening Chinese …러 갈까요?",  # 11 of 12 columns: 하 would make 13
        "",
        "",
        "",
    ]
    assert screen.cursor.y == 4 and screen.cursor.x < 40 - 1  # on the live line; the last column never written
