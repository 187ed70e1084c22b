"""Live captions in a terminal: the partial redrawn in place, finals committed as lines.

On a terminal the last line is the live one: the current partial (stable text plain, unstable
text dim), a level meter that shows audio is arriving, and the connection state. Finals are
printed as lines above it with their time. When the output is not a terminal (a pipe, a file)
only the finals are written, one per line, and the states go to stderr.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any, TextIO

import numpy as np

from ._transcript import Transcript

_CLEAR = "\r\x1b[2K"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"
_METER_WIDTH = 8
_REDRAW_INTERVAL_S = 0.1  # the meter alone redraws at most this often


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
            self._stable, self._unstable = event["stable"], event["unstable"]
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
        if not line.caption:
            return
        if self.live:
            stamp = f"{_DIM}[{_clock(line.start)}]{_RESET} "
            self.out.write(f"{_CLEAR}{stamp}{line.caption}\n")
        else:
            self.out.write(f"{line.caption}\n")
        self.out.flush()

    def _note(self, text: str) -> None:
        if self.live:
            self.out.write(f"{_CLEAR}{_DIM}-- {text}{_RESET}\n")
            self.out.flush()
        else:
            print(f"asrlive: {text}", file=self.err, flush=True)

    def _draw(self) -> None:
        if not self.live:
            return
        self._drawn_at = time.monotonic()
        language = f" {self.language}" if self.language else ""
        head = f"{meter(self._db)} {self.state}{language} "
        stable, unstable = _tail(self._stable, self._unstable, self.width() - len(head) - 1)
        self.out.write(f"{_CLEAR}{_DIM}{head}{_RESET}{stable}{_DIM}{unstable}{_RESET}")
        self.out.flush()

    def width(self) -> int:
        return shutil.get_terminal_size().columns


def _tail(stable: str, unstable: str, room: int) -> tuple[str, str]:
    """The end of the partial that fits on the live line: a wrapped line could not be redrawn in place."""
    if len(stable) + len(unstable) <= room:
        return stable, unstable
    start = len(stable) + len(unstable) - max(room - 1, 0)  # keep room - 1 characters after an ellipsis
    if start < len(stable):
        return "…" + stable[start:], unstable
    return "…", unstable[start - len(stable) :]


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"
