"""Live captions in a terminal: the partial redrawn in place, finals committed as lines.

On a terminal the last line is the live one: the current partial (stable text plain, unstable
text dim), a level meter that shows audio is arriving, and the connection state. Finals are
printed as lines above it with their time. When the output is not a terminal (a pipe, a file)
only the finals are written, one per line, and the states go to stderr.

The live line is measured in terminal columns (a Chinese character takes two) and kept one column short
of the width: a line that wrapped could not be redrawn in place and would leave a copy at every redraw.
Text from the server is flattened to one printable line first: no line breaks, no escape sequences.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import numpy as np

from ._transcript import Transcript
from ._width import cluster_width, clusters, display_width

_CLEAR = "\r\x1b[2K"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"
_METER_WIDTH = 8
_REDRAW_INTERVAL_S = 0.1  # the meter alone redraws at most this often
_ELLIPSIS = "…"

# What a terminal would act on rather than print, from a server we need not trust: CSI (colours, cursor
# moves, erasing; ESC [ or the C1 byte), the string commands (OSC: title, hyperlink, clipboard; DCS, SOS,
# PM, APC; to their terminator) and the short ESC forms (reset, charsets, saved cursor).
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
)
# A line break, tab, carriage return or other control character, with the spaces around it.
_BREAKS = re.compile(r" *[\x00-\x1f\x7f-\x9f\u2028\u2029][ \x00-\x1f\x7f-\x9f\u2028\u2029]*")
# Bidi controls make a bidi-aware terminal reorder the line; captions do not need them.
_BIDI = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# A lone surrogate (JSON allows one) cannot be encoded: writing it would end the client.
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def level_db(pcm: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-inf for digital silence)."""
    if pcm.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def meter(db: float) -> str:
    """An 8-cell bar from -60 dBFS to 0 dBFS."""
    filled = 0 if math.isinf(db) else round(min(max((db + 60) / 60, 0.0), 1.0) * _METER_WIDTH)
    return "▮" * filled + "▯" * (_METER_WIDTH - filled)


class Captions:
    """Consumes stream events (and audio levels); keeps the transcript."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr, live: bool | None = None) -> None:
        self.out, self.err = out, err
        self.live = out.isatty() if live is None else live
        self.transcript = Transcript()
        self.state = "connecting"
        self.language: str | None = None
        self._stable = self._unstable = ""
        self._db = -math.inf
        self._drawn_at = 0.0

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "status":
            self._status(event)
        elif kind == "partial":
            self._stable, self._unstable = _flat(event["stable"]), _flat(event["unstable"])
        elif kind == "final":
            self._final(event)
        elif kind == "error":
            self._note(f"server: {event.get('code')}: {event.get('message')}")
        elif kind == "lag":
            self.state = f"results {event['seconds']:.1f} s behind"
        self._draw()

    def on_audio(self, pcm: np.ndarray) -> None:
        self._db = level_db(pcm)
        if time.monotonic() - self._drawn_at >= _REDRAW_INTERVAL_S:
            self._draw()

    def close(self) -> None:
        if self.live:
            self.out.write(_CLEAR)
            self.out.flush()

    def _status(self, event: dict[str, Any]) -> None:
        state = event["state"]
        if state == "retrying":
            self.state = f"retrying in {event['delay']:g} s"
            self._note(event["reason"])
        elif state == "audio_lost":
            self._note(f"{event['seconds']:.1f} s of audio were lost: the server was unreachable too long")
        elif state == "reconnecting":
            self.state = "reconnecting"
            self._note(f"session ended ({event['reason']}); reconnecting, audio is kept")
        else:
            self.state = state

    def _final(self, event: dict[str, Any]) -> None:
        line = self.transcript.add(event)
        self.language = line.language or self.language
        if self.state.startswith("results"):  # a final arrived: the lag warning has had its say
            self.state = "listening"
        self._stable = self._unstable = ""
        caption = _flat(line.caption)  # may wrap above the live line, but must not drive the terminal
        if not caption:
            return
        if self.live:
            stamp = f"{_DIM}[{_clock(line.start)}]{_RESET} "
            self.out.write(f"{_CLEAR}{stamp}{caption}\n")
        else:  # a pipe often ends on a terminal too (| tee)
            self.out.write(f"{caption}\n")
        self.out.flush()

    def _note(self, text: str) -> None:
        text = _flat(text)  # server reasons and messages
        if self.live:
            self.out.write(f"{_CLEAR}{_DIM}-- {text}{_RESET}\n")
            self.out.flush()
        else:
            print(f"asrlive: {text}", file=self.err, flush=True)

    def _draw(self) -> None:
        if not self.live:
            return
        self._drawn_at = time.monotonic()
        cols = self.width() - 1  # the last column stays free: some terminals wrap as soon as it is written
        language = f" {self.language}" if self.language else ""
        head = _start(_flat(f"{meter(self._db)} {self.state}{language} "), cols)  # state, language: the server's
        stable, unstable = _tail(self._stable, self._unstable, cols - display_width(head))
        self.out.write(f"{_CLEAR}{_DIM}{head}{_RESET}{stable}{_DIM}{unstable}{_RESET}")
        self.out.flush()

    def width(self) -> int:
        return shutil.get_terminal_size().columns


def _tail(stable: str, unstable: str, room: int) -> tuple[str, str]:
    """The end of the partial that fits in room columns: a wrapped line could not be redrawn in place."""
    if display_width(stable) + display_width(unstable) <= room:
        return stable, unstable
    room -= display_width(_ELLIPSIS)
    if room < 0:
        return "", ""
    end = _end(unstable, room)
    if end != unstable:  # the unstable text alone is too wide: none of the stable text fits
        return _ELLIPSIS, end
    return _ELLIPSIS + _end(stable, room - display_width(unstable)), unstable


def _flat(text: str) -> str:
    """The text as one line a terminal prints as it is: no escape sequence, control character or line break."""
    text = _BIDI.sub("", _SURROGATES.sub("\ufffd", _ESCAPES.sub("", text)))
    return _BREAKS.sub(" ", text)


def _fit(pieces: Iterable[str], cols: int) -> list[str]:
    """The leading clusters that take at most cols columns: a wide character that would not fit is left out."""
    kept: list[str] = []
    for cluster in pieces:
        cols -= cluster_width(cluster)
        if cols < 0:
            break
        kept.append(cluster)
    return kept


def _start(text: str, cols: int) -> str:
    return "".join(_fit(clusters(text), cols))


def _end(text: str, cols: int) -> str:
    return "".join(reversed(_fit(reversed(clusters(text)), cols)))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"
