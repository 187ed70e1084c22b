"""Clients: the asyncio client of the streaming protocol, the reconnecting live stream, transcripts."""

from ._client import Event, SessionRefused, Stream, connect
from ._live import LiveOptions, LiveStream, StreamFailed
from ._transcript import Line, Transcript

__all__ = [
    "Event",
    "Line",
    "LiveOptions",
    "LiveStream",
    "SessionRefused",
    "Stream",
    "StreamFailed",
    "Transcript",
    "connect",
]
