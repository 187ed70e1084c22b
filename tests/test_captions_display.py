"""The terminal captions: what a terminal and what a pipe receive for the same events."""

from __future__ import annotations

import io
import math

import numpy as np

from asrlive.clients._display import Captions, level_db, meter

PARTIAL = {"type": "partial", "segment": 0, "text": "hello wor", "stable": "hello ", "unstable": "wor"}
FINAL = {"type": "final", "segment": 0, "text": " hello world", "language": "English", "start": 61.2, "end": 62.5}


def _events(captions: Captions) -> None:
    captions.on_event({"type": "status", "state": "listening", "offset": 0.0})
    captions.on_audio(np.full(1600, 0.1, np.float32))
    captions.on_event({**PARTIAL, "token_ids": [1]})
    captions.on_event({**FINAL, "token_ids": [1, 2]})
    captions.on_event({"type": "status", "state": "reconnecting", "reason": "connection_lost"})


def test_a_terminal_gets_the_partial_redrawn_in_place_and_finals_as_lines():
    out = io.StringIO()
    captions = Captions(out=out, err=io.StringIO(), live=True)
    _events(captions)
    screen = out.getvalue()
    redraws = screen.split("\r\x1b[2K")
    partial = next(r for r in redraws if "hello " in r and "wor" in r and "world" not in r)
    assert partial.endswith("hello \x1b[2mwor\x1b[0m")  # stable plain, unstable dim
    assert partial.startswith("\x1b[2m▮▮▮▮▮▯▯▯ listening \x1b[0m")  # the level: audio is arriving
    assert "\x1b[2m[01:01]\x1b[0m hello world\n" in redraws
    assert any("session ended (connection_lost); reconnecting, audio is kept" in r for r in redraws)
    assert redraws[-1].startswith("\x1b[2m▮▮▮▮▮▯▯▯ reconnecting English \x1b[0m")  # -20 dBFS: 5 of 8 cells
    assert [line.text for line in captions.transcript.lines] == [" hello world"]


def test_a_pipe_gets_only_the_finals_and_notes_go_to_stderr():
    out, err = io.StringIO(), io.StringIO()
    _events(Captions(out=out, err=err, live=False))
    assert out.getvalue() == "hello world\n"
    assert err.getvalue() == "asrlive: session ended (connection_lost); reconnecting, audio is kept\n"


def test_a_long_partial_shows_its_end_on_one_line(monkeypatch):
    out = io.StringIO()
    captions = Captions(out=out, err=io.StringIO(), live=True)
    monkeypatch.setattr(captions, "width", lambda: 40)  # the head takes 19 columns: 20 for the text, 1 spare
    captions.on_event({"type": "status", "state": "listening", "offset": 0.0})
    captions.on_event({**PARTIAL, "stable": "one two three four ", "unstable": "five six", "token_ids": [1]})
    assert out.getvalue().endswith("\x1b[0m…three four \x1b[2mfive six\x1b[0m")
    captions.on_event({**PARTIAL, "stable": "one ", "unstable": "two three four five six seven", "token_ids": [1]})
    assert out.getvalue().endswith("\x1b[0m…\x1b[2mfour five six seven\x1b[0m")


def test_level_meter():
    assert level_db(np.zeros(160, np.float32)) == -math.inf and meter(-math.inf) == "▯" * 8
    assert round(level_db(np.full(160, 0.5, np.float32)), 2) == -6.02
    assert meter(0.0) == "▮" * 8 and meter(-30.0) == "▮" * 4 + "▯" * 4
