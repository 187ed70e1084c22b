"""The wire protocol, version 1 (docs/protocol.md): parsing and validating what a client sends.

Sans-I/O: text messages in, typed requests or a ``ProtocolError`` out; audio frames in, 16 kHz
mono float32 out. Every error has a stable code, which the server reports in an ``error`` event,
counts in its metrics, and maps to a close code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import soxr

from ._events import SAMPLE_RATE

PROTOCOL_VERSION = 1
ENCODINGS = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MAX_CONTEXT_CHARS = 10_000


class CloseCode(IntEnum):
    NORMAL = 1000  # the client's finish was honoured: every final was sent, then done
    GOING_AWAY = 1001  # the server is shutting down; open utterances got their finals first
    MESSAGE_TOO_BIG = 1009  # a message over the hard size limit (closed by the WebSocket layer)
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # server full or overloaded: nothing was started
    BAD_REQUEST = 4400  # the client broke the protocol; the error event says how
    UNAUTHORIZED = 4401
    IDLE_TIMEOUT = 4408
    PEER_LOST = 4410  # WebRTC only: the peer connection failed or was closed before the session ended
    SESSION_TOO_LONG = 4413


# error code -> close code; the error event's "code" field is the key.
ERRORS: dict[str, CloseCode] = {
    "bad_json": CloseCode.BAD_REQUEST,
    "bad_message": CloseCode.BAD_REQUEST,
    "unknown_type": CloseCode.BAD_REQUEST,
    "not_started": CloseCode.BAD_REQUEST,
    "already_started": CloseCode.BAD_REQUEST,
    "bad_start": CloseCode.BAD_REQUEST,
    "unsupported_protocol": CloseCode.BAD_REQUEST,
    "unsupported_sample_rate": CloseCode.BAD_REQUEST,
    "unsupported_encoding": CloseCode.BAD_REQUEST,
    "bad_audio": CloseCode.BAD_REQUEST,
    "frame_too_large": CloseCode.BAD_REQUEST,
    "unauthorized": CloseCode.UNAUTHORIZED,
    "server_full": CloseCode.TRY_AGAIN_LATER,
    "server_busy": CloseCode.TRY_AGAIN_LATER,
    "idle_timeout": CloseCode.IDLE_TIMEOUT,
    "session_too_long": CloseCode.SESSION_TOO_LONG,
    "internal_error": CloseCode.INTERNAL_ERROR,
    # WebRTC (/v1/rtc) only:
    "bad_sdp": CloseCode.BAD_REQUEST,
    "rtc_failed": CloseCode.PEER_LOST,
}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        if code not in ERRORS:
            raise ValueError(f"undocumented error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def close_code(self) -> CloseCode:
        return ERRORS[self.code]

    def to_json(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}


@dataclass(frozen=True)
class Start:
    language: str | None = None  # None: detected
    context: str = ""
    sample_rate: int = SAMPLE_RATE
    encoding: str = "pcm_s16le"
    partials: bool = True
    partial_interval_ms: int | None = None  # None: the server's default


@dataclass(frozen=True)
class Finish:
    pass


_START_FIELDS = {
    "type",
    "protocol",
    "language",
    "context",
    "sample_rate",
    "encoding",
    "partials",
    "partial_interval_ms",
}


def parse_message(text: str, started: bool = False) -> Start | Finish:
    """A client text message; raises ProtocolError with the code that says what is wrong.

    ``started``: the session has started, so a start message is refused before it is examined.
    """
    message = decode_message(text)
    kind = message["type"]
    if kind == "finish":
        return Finish()
    if kind == "start":
        if started:
            raise ProtocolError("already_started", 'this session has started; send audio or "finish"')
        return parse_start(message)
    raise ProtocolError("unknown_type", f'unknown message type {kind!r}; expected "start" or "finish"')


def decode_message(text: str) -> dict[str, Any]:
    """A text message as a JSON object with a string ``type``, else ``bad_json`` or ``bad_message``."""
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise ProtocolError("bad_json", f"text messages must be JSON objects: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'a text message must be a JSON object with a string "type"')
    return message


def parse_start(message: dict[str, Any]) -> Start:
    """A decoded ``start`` message's fields, validated."""
    unknown = sorted(set(message) - _START_FIELDS)
    if unknown:
        raise ProtocolError("bad_start", f"unknown start fields {unknown}; known: {sorted(_START_FIELDS)}")
    version = message.get("protocol", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_protocol", f"this server speaks protocol {PROTOCOL_VERSION}")
    language = _field(message, "language", (str, type(None)), None)
    context = _field(message, "context", str, "")
    if len(context) > MAX_CONTEXT_CHARS:
        raise ProtocolError("bad_start", f"context is longer than {MAX_CONTEXT_CHARS} characters")
    rate = _field(message, "sample_rate", int, SAMPLE_RATE)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(
            "unsupported_sample_rate", f"sample_rate {rate} is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    encoding = _field(message, "encoding", str, "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError("unsupported_encoding", f"encoding {encoding!r} is not one of {sorted(ENCODINGS)}")
    interval = _field(message, "partial_interval_ms", (int, type(None)), None)
    if interval is not None and not 100 <= interval <= 60_000:
        raise ProtocolError("bad_start", "partial_interval_ms must be within 100..60000")
    partials = _field(message, "partials", bool, True)
    return Start(None if language in (None, "", "auto") else language, context, rate, encoding, partials, interval)


def _field(message: dict[str, Any], name: str, kinds, default):
    value = message.get(name, default)
    # bool is an int in Python; a JSON true is not a sample rate.
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is int):
        raise ProtocolError("bad_start", f"start field {name!r} has the wrong type: {value!r}")
    return value


class AudioDecoder:
    """Binary frames in the negotiated encoding and rate -> 16 kHz mono float32 in [-1, 1]."""

    def __init__(self, start: Start) -> None:
        self.dtype = ENCODINGS[start.encoding]
        self.input_rate = start.sample_rate
        self._resampler = (
            soxr.ResampleStream(start.sample_rate, SAMPLE_RATE, 1, dtype="float32")
            if start.sample_rate != SAMPLE_RATE
            else None
        )
        self.samples_in = 0  # at the client's rate

    @property
    def seconds(self) -> float:
        return self.samples_in / self.input_rate

    def decode(self, frame: bytes) -> np.ndarray:
        if len(frame) % self.dtype.itemsize:
            raise ProtocolError(
                "bad_audio", f"a {len(frame)}-byte frame is not a whole number of {self.dtype.itemsize}-byte samples"
            )
        samples = np.frombuffer(frame, dtype=self.dtype)
        if self.dtype.kind == "i":
            pcm = samples.astype(np.float32) / 32768.0
        else:
            pcm = samples.astype(np.float32)
            if not np.isfinite(pcm).all():
                raise ProtocolError("bad_audio", "float samples must be finite (no NaN or infinity)")
            np.clip(pcm, -1.0, 1.0, out=pcm)
        self.samples_in += samples.size
        return self._resampler.resample_chunk(pcm) if self._resampler else pcm

    def flush(self) -> np.ndarray:
        """The resampler's delayed tail, at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
