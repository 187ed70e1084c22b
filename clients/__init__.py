"""Clients: the asyncio client of the streaming protocol, the reconnecting live stream, transcripts."""

from ._client import STREAM_PATH, Event, SessionRefused, Stream, connect, stream_url
from ._live import LiveOptions, LiveStream, StreamFailed
from ._transcript import Line, Transcript

__all__ = [
    "STREAM_PATH",
    "Event",
    "Line",
    "LiveOptions",
    "LiveStream",
    "SessionRefused",
    "Stream",
    "StreamFailed",
    "Transcript",
    "connect",
    "stream_url",
]
