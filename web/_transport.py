"""Where a session's messages come from and where its events go: the part of a connection that
differs between the WebSocket protocol (``/v1/stream``), WebRTC (``/v1/rtc``, web/_rtc.py) and the
OpenAI Realtime endpoint (``/v1/realtime``).

The lifecycle around it (limits, draining, close codes, metrics) is the same for every transport
and lives in web/_connection.py. A protocol v1 transport (``StreamTransport``) turns what the
client sends into two kinds of items, text control messages and 16 kHz mono float32 audio; the
Realtime one (``Transport`` itself) hands over the WebSocket's messages as they are. Both deliver
event JSON.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.exceptions import ConnectionClosed

from asrlive.streaming import AudioDecoder, ProtocolError, Start, parse_message

if TYPE_CHECKING:
    from ._options import ServerOptions
    from ._websocket import ServerWebSocket

Incoming = str | np.ndarray  # a text control message, or audio at 16 kHz


class Transport:
    """One client's channels. ``ws`` is the WebSocket the session was opened on; ``receive``
    raises ``ConnectionClosed`` once the client is gone. As it is: the WebSocket's messages."""

    # Whether the connection sends ``ready`` before it reads past ``start``: true where reading is
    # reading the WebSocket, whose layer may close the connection at a read (1007, invalid UTF-8).
    sends_ready_before_reading = True

    def __init__(self, ws: ServerWebSocket, options: ServerOptions) -> None:
        self.ws = ws
        self.options = options
        self._discarding: asyncio.Task[None] | None = None

    async def receive(self) -> str | bytes | np.ndarray:
        """The client's next message; ProtocolError for input that breaks the protocol."""
        return await self.ws.recv()

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    def stop_receiving(self) -> None:
        """Read and drop whatever the client still sends: unread frames would stall the closing handshake.

        Idempotent: the WebSocket has one reader at a time (a second would take the first one's messages)."""
        if self._discarding is not None:
            return

        async def discard() -> None:
            try:
                async for _ in self.ws:
                    pass
            except ConnectionClosed:
                return

        self._discarding = asyncio.create_task(discard())

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)

    async def release(self) -> None:
        """Free everything the transport holds; called once, however the session ended."""
        # Cancelled and awaited, and forgotten: a cancelled task keeps its CancelledError, whose
        # traceback holds the task's frame, which holds this transport (a reference cycle).
        discarding, self._discarding = self._discarding, None
        if discarding is not None:
            discarding.cancel()
            await asyncio.wait({discarding})


class StreamTransport(Transport, ABC):
    """Protocol v1's: a ``start`` of its own, then text messages and 16 kHz audio."""

    @abstractmethod
    def parse_start(self, text: str) -> Start:
        """The first text message, validated (ProtocolError if it is not a valid start)."""

    @abstractmethod
    async def open(self, start: Start) -> dict[str, Any]:
        """Prepare to receive audio; returns the ``ready`` fields this transport decides
        (``sample_rate``, ``encoding``)."""

    @abstractmethod
    async def receive(self) -> Incoming:
        """The client's next message; ProtocolError for input that breaks the protocol."""

    @abstractmethod
    def flush(self) -> np.ndarray:
        """Audio still held back (a resampler's tail) at the end of the stream."""

    @property
    @abstractmethod
    def seconds(self) -> float:
        """Audio received so far, in seconds at the client's rate."""


class WebSocketTransport(StreamTransport):
    """Protocol v1: JSON text messages and binary PCM frames on one WebSocket (docs/protocol.md)."""

    def __init__(self, ws: ServerWebSocket, options: ServerOptions) -> None:
        super().__init__(ws, options)
        self._decoder: AudioDecoder | None = None

    def parse_start(self, text: str) -> Start:
        request = parse_message(text)
        if not isinstance(request, Start):
            raise ProtocolError("not_started", 'the first message must be "start"')
        return request

    async def open(self, start: Start) -> dict[str, Any]:
        self._decoder = AudioDecoder(start)
        return {"sample_rate": start.sample_rate, "encoding": start.encoding}

    async def receive(self) -> Incoming:
        message = await self.ws.recv()
        if isinstance(message, str):
            return message
        if self._decoder is None:
            raise ProtocolError("not_started", 'send a "start" message before any audio')
        if len(message) > self.options.max_frame_bytes:
            raise ProtocolError(
                "frame_too_large",
                f"a {len(message)}-byte frame exceeds the limit of {self.options.max_frame_bytes} bytes",
            )
        return self._decoder.decode(message)

    def flush(self) -> np.ndarray:
        assert self._decoder is not None
        return self._decoder.flush()

    @property
    def seconds(self) -> float:
        return self._decoder.seconds if self._decoder else 0.0
