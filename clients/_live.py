"""A live stream that survives dropped connections: capture never stops, no final is lost, no audio sent twice.

The client keeps every captured sample that no final covers yet (``AudioBuffer``). A session
sends that backlog, then new audio as it is captured. When the connection drops, a new session
starts where the last final ended and the backlog is sent again; the server transcribes it as
if nothing had happened. Audio that a final already covers is never sent again, so no utterance
is transcribed twice. Event times are shifted by where their session started, so they count from
the start of the capture whatever the number of sessions.

1. ``LiveStream.run`` owns two tasks: capture (the audio source into the buffer) and sessions.
2. A session: connect (retrying with backoff while the server is unreachable, full or busy),
   send the backlog and then the live audio, read events; it ends with ``done``.
3. ``done`` after ``finish`` ends the stream. Any other end (a drop, the server shutting down, the
   session reaching its length limit) starts the next session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from asrlive._audio import SAMPLE_RATE
from asrlive._words import words_from_json

from ._client import STREAM_PATH, Event, SessionRefused, Stream, connect, stream_url

FRAME = SAMPLE_RATE // 10  # 100 ms per message
RETRYABLE = {"server_full", "server_busy", "closed"}  # refusals worth waiting out
RESUMABLE = {"connection_lost", "shutdown", "session_too_long", "idle_timeout", "internal_error"}
_TIMED = ("start", "end", "audio_end")


class StreamFailed(Exception):
    """The stream cannot go on: the server refused it for good (bad token, bad start), or gave up."""


@dataclass(frozen=True)
class LiveOptions:
    url: str
    language: str | None = None
    context: str = ""
    partials: bool = True
    timestamps: bool = False  # word times on finals (the server needs a forced aligner)
    token: str | None = None
    connect_timeout_s: float = 10.0
    retry_delays_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # the last one repeats
    max_attempts: int = 0  # consecutive failed connects before giving up; 0: never give up
    max_backlog_s: float = 600.0  # audio kept while disconnected; the oldest goes beyond this

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", stream_url(self.url))  # ValueError for what is no server address


class AudioBuffer:
    """16 kHz float32 samples by their position in the capture; the oldest dropped once final.

    Chunks are kept as captured, with their positions, so reading the newest audio or releasing
    the oldest costs what is read or released, however long the backlog has grown.
    """

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.base = 0  # capture position of the first kept sample
        self.end = 0  # capture position after the last captured sample
        self.sent = 0  # capture position up to which the current session has sent
        self.lost = 0  # samples dropped unsent because the backlog overflowed
        self.closed = False  # the source has ended
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (position, samples)
        self._changed = asyncio.Event()

    def append(self, pcm: np.ndarray) -> None:
        self._chunks.append((self.end, np.asarray(pcm, dtype=np.float32)))
        self.end += pcm.size
        overflow = self.end - self.base - self.max_samples
        if overflow > 0:
            self.lost += max(0, self.base + overflow - max(self.sent, self.base))
            self.release(self.base + overflow)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def release(self, position: int) -> None:
        """Forget everything before ``position`` (a final covers it)."""
        position = min(max(position, self.base), self.end)
        while self._chunks and self._chunks[0][0] + self._chunks[0][1].size <= position:
            self._chunks.popleft()
        if self._chunks and self._chunks[0][0] < position:
            start, samples = self._chunks.popleft()
            self._chunks.appendleft((position, samples[position - start :]))
        self.base = position

    def read(self, position: int) -> np.ndarray:
        """The kept samples from ``position`` (or the oldest kept, if later) on."""
        position = max(position, self.base)
        tail: list[np.ndarray] = []
        for start, samples in reversed(self._chunks):
            tail.append(samples[max(position - start, 0) :])
            if start <= position:
                break
        return np.concatenate(tail[::-1]) if tail else np.zeros(0, np.float32)

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()


class LiveStream:
    """``await LiveStream(options, on_event).run(source)``: the finals, whatever the network did."""

    def __init__(self, options: LiveOptions, on_event: Callable[[Event], Any]) -> None:
        self.options = options
        self.on_event = on_event
        self.buffer = AudioBuffer(round(options.max_backlog_s * SAMPLE_RATE))
        self.sessions = 0  # sessions opened
        self.session_starts: list[int] = []  # capture position where each session began

    async def run(self, source: AsyncIterator[np.ndarray]) -> None:
        capture = asyncio.create_task(self._capture(source))
        try:
            while not await self._session():
                pass
        finally:
            capture.cancel()
        if self.buffer.lost:
            self.on_event({"type": "status", "state": "audio_lost", "seconds": self.buffer.lost / SAMPLE_RATE})
        failure = capture.exception() if capture.done() and not capture.cancelled() else None
        if failure is not None:
            raise failure  # the source failed; what it captured before has its finals

    async def _capture(self, source: AsyncIterator[np.ndarray]) -> None:
        try:
            async for pcm in source:
                self.buffer.append(pcm)
        finally:
            self.buffer.close()

    async def _session(self) -> bool:
        """One server session; True once the stream is complete."""
        async with contextlib.AsyncExitStack() as stack:
            live = await self._connect(stack)
            offset = self.buffer.base
            self.session_starts.append(offset)
            self.on_event({"type": "status", "state": "listening", "offset": offset / SAMPLE_RATE})
            sender = asyncio.create_task(self._send(live, offset))
            try:
                done = await self._receive(live, offset)
            finally:
                sender.cancel()
        reason = done["reason"] if done is not None else "connection_lost"
        if reason == "finish":
            return True
        if reason not in RESUMABLE:
            raise StreamFailed(f"the server ended the session: {reason}")
        self.on_event({"type": "status", "state": "reconnecting", "reason": reason})
        return False

    async def _connect(self, stack: contextlib.AsyncExitStack) -> Stream:
        options = self.options
        failures = 0
        while True:
            self.on_event({"type": "status", "state": "connecting", "attempt": failures + 1})
            opening = connect(
                options.url,
                language=options.language,
                context=options.context,
                partials=options.partials,
                timestamps=options.timestamps,
                token=options.token,
                timeout=options.connect_timeout_s,
            )
            try:
                live = await stack.enter_async_context(opening)
            except SessionRefused as refusal:
                if refusal.code not in RETRYABLE:
                    raise StreamFailed(f"the server refused the session: {refusal}") from None
                reason = str(refusal)
            except InvalidStatus as exc:
                if exc.response.status_code == 404:  # a server, but not this path: retrying cannot help
                    raise StreamFailed(
                        f"{options.url} is not a streaming endpoint (HTTP 404); "
                        f"an asrlive server streams at ws://HOST:PORT{STREAM_PATH}"
                    ) from None
                reason = f"cannot reach {options.url}: {exc}"
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                reason = f"cannot reach {options.url}: {exc or type(exc).__name__}"
            else:
                self.sessions += 1
                return live
            failures += 1
            if options.max_attempts and failures >= options.max_attempts:
                raise StreamFailed(f"gave up after {failures} attempts: {reason}")
            delay = options.retry_delays_s[min(failures, len(options.retry_delays_s)) - 1]
            self.on_event({"type": "status", "state": "retrying", "reason": reason, "delay": delay})
            await asyncio.sleep(delay)

    async def _send(self, live: Stream, offset: int) -> None:
        """The backlog from ``offset``, then live audio as it arrives; ``finish`` when the source ends."""
        self.buffer.sent = position = offset
        try:
            while True:
                position = max(position, self.buffer.base)
                pending = self.buffer.read(position)
                for begin in range(0, pending.size, FRAME):
                    await live.send_audio(pending[begin : begin + FRAME])
                    self.buffer.sent = position + min(begin + FRAME, pending.size)
                position += pending.size
                if self.buffer.closed and position >= self.buffer.end:
                    await live.finish()
                    return
                await self.buffer.changed()
        except ConnectionClosed:
            return  # the receiver sees the end too and decides what comes next

    async def _receive(self, live: Stream, offset: int) -> Event | None:
        """Forward events with capture times; the ``done`` event, or None if the connection dropped."""
        shift = offset / SAMPLE_RATE
        async for event in live:
            for key in _TIMED:
                if key in event:
                    event[key] += shift
            if event.get("words"):
                event["words"] = [word.shifted(shift).to_json() for word in words_from_json(event["words"]) or ()]
            if event["type"] == "final":
                self.buffer.release(round(event["end"] * SAMPLE_RATE))
            self.on_event(event)
            if event["type"] == "done":
                return event
        return None
