"""The wire protocol, version 1 (docs/protocol.md): parsing and validating what a client sends.

Sans-I/O: text messages in, typed requests or a ``ProtocolError`` out; audio frames in, 16 kHz
mono float32 out. Every error has a stable code, which the server reports in an ``error`` event,
counts in its metrics, and maps to a close code.

Whatever a client sends, these functions return or raise ``ProtocolError``, never anything else,
and an error's message is short, valid Unicode whatever it quotes: a hostile message must end
its own session cleanly, not crash the handler or make the error event unsendable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NoReturn

import numpy as np
import soxr

from ._events import SAMPLE_RATE

PROTOCOL_VERSION = 1
ENCODINGS: dict[str, np.dtype[Any]] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MAX_CONTEXT_CHARS = 10_000
MAX_LANGUAGE_CHARS = 64  # the longest language name is 10 characters
# JSON this server reads (RFC 8259 section 9 lets a parser limit both): valid messages are flat
# objects with small numbers, and deeper or longer input only costs stack and CPU (int() of an
# n-digit string is quadratic when Python's own digit limit is switched off).
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 100
QUOTE_CHARS = 80  # how much of a client's value an error message repeats


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
    timestamps: bool = False  # word times on every final (a server with a forced aligner)


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
    "timestamps",
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
    raise ProtocolError("unknown_type", f'unknown message type {quote(kind)}; expected "start" or "finish"')


def decode_message(text: str) -> dict[str, Any]:
    """A text message as a JSON object with a string ``type``, else ``bad_json`` or ``bad_message``."""
    try:
        message = json.loads(text, object_pairs_hook=_object, parse_int=_integer, parse_constant=_not_json)
    except _Unreadable as exc:
        raise ProtocolError("bad_message", str(exc)) from None
    except RecursionError:  # nested deeper than the interpreter's stack, far past MAX_JSON_DEPTH
        raise ProtocolError("bad_message", _TOO_DEEP) from None
    except ValueError as exc:
        raise ProtocolError("bad_json", f"text messages must be JSON objects: {exc}") from None
    if _deeper_than(message, MAX_JSON_DEPTH):
        raise ProtocolError("bad_message", _TOO_DEEP)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'a text message must be a JSON object with a string "type"')
    return message


_TOO_DEEP = f"arrays and objects may be nested at most {MAX_JSON_DEPTH} deep"


class _Unreadable(Exception):
    """Valid JSON this server does not read (duplicate keys, huge integers): ``bad_message``."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a key twice, parsers disagree on which value counts; a proxy that checked the first
    # one would let the last one through.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Unreadable(f"the key {quote(key)} appears twice in one object")
            seen.add(key)
    return obj


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Unreadable(f"integers may have at most {MAX_INT_DIGITS} digits")
    return int(digits)


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")  # Python's json reads NaN and Infinity; RFC 8259 does not


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep (the message object itself is 1)."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iterative: the value may be nested as deep as the parser's stack allowed
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages.

    repr escapes lone surrogates, so the result is always valid Unicode (sendable as UTF-8),
    and the cut keeps a message short whatever a client sent.
    """
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def parse_start(message: dict[str, Any]) -> Start:
    """A decoded ``start`` message's fields, validated."""
    unknown = sorted(set(message) - _START_FIELDS)
    if unknown:
        raise ProtocolError("bad_start", f"unknown start fields {quote(unknown)}; known: {sorted(_START_FIELDS)}")
    version = message.get("protocol", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_protocol", f"this server speaks protocol {PROTOCOL_VERSION}")
    language = _field(message, "language", (str, type(None)), None)
    if language is not None:
        check_text(language, "language", MAX_LANGUAGE_CHARS, "bad_start", multiline=False)
    context = _field(message, "context", str, "")
    check_text(context, "context", MAX_CONTEXT_CHARS, "bad_start", multiline=True)
    rate = _field(message, "sample_rate", int, SAMPLE_RATE)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(
            "unsupported_sample_rate",
            f"sample_rate {quote(rate)} is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
        )
    encoding = _field(message, "encoding", str, "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError("unsupported_encoding", f"encoding {quote(encoding)} is not one of {sorted(ENCODINGS)}")
    interval = _field(message, "partial_interval_ms", (int, type(None)), None)
    if interval is not None and not 100 <= interval <= 60_000:
        raise ProtocolError("bad_start", "partial_interval_ms must be within 100..60000")
    partials = _field(message, "partials", bool, True)
    timestamps = _field(message, "timestamps", bool, False)
    language = None if language in (None, "", "auto") else language
    return Start(language, context, rate, encoding, partials, interval, timestamps)


def _field(message: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any) -> Any:
    value = message.get(name, default)
    # bool is an int in Python; a JSON true is not a sample rate.
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is int):
        raise ProtocolError("bad_start", f"start field {name!r} has the wrong type: {quote(value)}")
    return value


# C0 and C1 control characters and DEL: no one types them as a hint for the model, and NUL ends a
# string in C code (native libraries, log tooling). Tab, line feed and carriage return are allowed
# where text may have lines.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile(r"[\t\n\r]")


def check_text(text: str, name: str, max_chars: int, code: str, multiline: bool) -> None:
    """Client text that reaches the model or its tokenizer: at most ``max_chars`` Unicode scalar
    values, no control characters; else ProtocolError ``code``.

    JSON can spell a lone surrogate (``"\\ud800"``), which is no character: it cannot be encoded as
    UTF-8, so the tokenizer would fail on it long after the session has started.
    """
    if len(text) > max_chars:
        raise ProtocolError(code, f"{name} is longer than {max_chars} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            code, f"{name} is not valid Unicode: a lone surrogate {quote(exc.object[exc.start])} at {exc.start}"
        ) from None
    control = _CONTROL.search(text) or (None if multiline else _LINE_BREAK.search(text))
    if control is not None:
        raise ProtocolError(code, f"{name} has a control character {quote(control.group())} at {control.start()}")


def check_context_tokens(context: str, reserved: Iterable[str]) -> None:
    """``bad_start`` if the context spells one of the model's control tokens (``<|im_end|>``,
    ``<|audio_pad|>``, ``<asr_text>``, ...).

    The tokenizer reads such text as the token itself, so a context could close the system turn
    and write the rest of the prompt (or add audio placeholders) instead of being plain text.
    """
    for token in reserved:
        if token and token in context:
            raise ProtocolError("bad_start", f"context may not contain the model's control token {quote(token)}")


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
        if self._resampler is None:
            return pcm
        resampled: np.ndarray = self._resampler.resample_chunk(pcm)
        return resampled

    def flush(self) -> np.ndarray:
        """The resampler's delayed tail, at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail: np.ndarray = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return tail
