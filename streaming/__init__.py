"""The sans-I/O streaming session: PCM in, events out (no torch, no sockets)."""

from ._events import SAMPLE_RATE, Event, Final, Partial, SpeechStarted, SpeechStopped
from ._protocol import (
    ENCODINGS,
    ERRORS,
    PROTOCOL_VERSION,
    AudioDecoder,
    CloseCode,
    Finish,
    ProtocolError,
    Start,
    decode_message,
    parse_message,
    parse_start,
)
from ._session import Job, Session, SessionOptions
from ._text import stable_prefix
from ._vad import VadOptions

__all__ = [
    "ENCODINGS",
    "ERRORS",
    "PROTOCOL_VERSION",
    "AudioDecoder",
    "CloseCode",
    "Finish",
    "ProtocolError",
    "Start",
    "decode_message",
    "parse_message",
    "parse_start",
    "SAMPLE_RATE",
    "Event",
    "Final",
    "Job",
    "Partial",
    "Session",
    "SessionOptions",
    "SpeechStarted",
    "SpeechStopped",
    "VadOptions",
    "stable_prefix",
]
