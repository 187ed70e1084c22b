"""A small asyncio client for the streaming protocol (docs/protocol.md)::

    async with connect("ws://localhost:8765/v1/stream", language="English") as stream:
        await stream.send_audio(pcm)          # float32 in [-1, 1] or int16, at the start's rate
        await stream.finish()
        async for event in stream:            # dicts, as documented; ends after "done"
            if event["type"] == "final":
                print(event["text"])

Sending and receiving are independent: send from one task while another iterates the events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

Event = dict[str, Any]
CLOSE_TIMEOUT_S = 10.0
STREAM_PATH = "/v1/stream"  # the server's streaming endpoint (docs/protocol.md)
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def stream_url(url: str) -> str:
    """The WebSocket URL of a server given as ``asrlive serve`` prints it, or as a person types it.

    ``http://HOST:PORT`` (the page) and ``HOST:PORT`` mean ``ws://HOST:PORT/v1/stream``; https
    becomes wss. An explicit path is kept, so a wrong one is reported by the server, not guessed.
    """
    text = url.strip()
    if "://" not in text:
        text = f"ws://{text}"
    parts = urlsplit(text)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"{url!r} is not a server address; use ws://HOST:PORT{STREAM_PATH} or http://HOST:PORT")
    path = parts.path if parts.path not in ("", "/") else STREAM_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class SessionRefused(Exception):
    """The server answered the start with an error (full, busy, unauthorized, bad start...)."""

    def __init__(self, event: Event, close_code: int | None) -> None:
        super().__init__(f"{event.get('code')}: {event.get('message')}")
        self.code: str = event.get("code", "")
        self.message: str = event.get("message", "")
        self.close_code = close_code


class Stream:
    def __init__(self, ws: ClientConnection, ready: Event, encoding: str) -> None:
        self.ws = ws
        self.ready = ready
        self._dtype = np.dtype("<i2") if encoding == "pcm_s16le" else np.dtype("<f4")

    async def send_audio(self, pcm: np.ndarray | bytes) -> None:
        """Send one frame; float arrays are converted to the session's encoding."""
        if isinstance(pcm, np.ndarray):
            pcm = _encode(pcm, self._dtype)
        await self.ws.send(pcm)

    async def finish(self) -> None:
        """No more audio: the server sends the remaining finals, then ``done``, then closes."""
        await self.ws.send(json.dumps({"type": "finish"}))

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for message in self.ws:
                event = json.loads(message)
                yield event
                if event.get("type") == "done":
                    await asyncio.wait_for(self.ws.wait_closed(), CLOSE_TIMEOUT_S)  # the close code follows
                    return
        except ConnectionClosed:
            return  # the close code tells why (``close_code``)

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


def _encode(pcm: np.ndarray, dtype: np.dtype) -> bytes:
    if pcm.dtype.kind == "f" and dtype.kind == "i":
        pcm = np.round(np.clip(pcm, -1.0, 32767 / 32768) * 32768)
    elif pcm.dtype.kind == "i" and dtype.kind == "f":
        pcm = pcm / 32768.0
    return np.ascontiguousarray(pcm, dtype=dtype).tobytes()


@asynccontextmanager
async def connect(
    url: str,
    *,
    language: str | None = None,
    context: str = "",
    sample_rate: int = 16_000,
    encoding: str = "pcm_s16le",
    partials: bool = True,
    partial_interval_ms: int | None = None,
    timestamps: bool = False,
    token: str | None = None,
    timeout: float = 30.0,
) -> AsyncIterator[Stream]:
    """Open a session; raises SessionRefused if the server says no, TimeoutError if it does not answer.

    ``timestamps``: every final carries its words' times (a server started with ``--aligner``).
    """
    url = stream_url(url)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    start: Event = {"type": "start", "protocol": 1, "language": language, "context": context}
    start |= {"sample_rate": sample_rate, "encoding": encoding, "partials": partials}
    if partial_interval_ms is not None:
        start["partial_interval_ms"] = partial_interval_ms
    if timestamps:
        start["timestamps"] = True
    async with ws_connect(url, additional_headers=headers, open_timeout=timeout, max_size=None) as ws:
        try:
            await ws.send(json.dumps(start))
        except ConnectionClosed:
            pass  # refused at once; the reason is the first message, read below
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        except ConnectionClosed:
            raise SessionRefused({"code": "closed", "message": "closed before ready"}, ws.close_code) from None
        if first.get("type") != "ready":
            await asyncio.wait_for(ws.wait_closed(), timeout)
            raise SessionRefused(first, ws.close_code)
        yield Stream(ws, first, encoding)
