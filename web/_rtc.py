"""WebRTC ingress (``/v1/rtc``, docs/protocol.md section 13): the microphone arrives as a WebRTC
audio track, results leave over a data channel, and everything in between is the same session.

Signalling is a WebSocket: the client's ``start`` carries its SDP offer, the server answers with
``{"type": "answer"}`` on the WebSocket, and ``finish`` comes over the WebSocket too. The track's
frames (Opus decoded by aiortc/PyAV: 48 kHz) are mixed to mono and resampled to 16 kHz with soxr.
Events go over the data channel ("events", negotiated, id 0) once it is open, and over the
WebSocket while it is not (it never opened, or it closed): a client reads both.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, cast

import av
import numpy as np
import soxr
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription
from websockets.exceptions import ConnectionClosed

from asrlive.streaming import SAMPLE_RATE, ProtocolError, Start, decode_message, parse_start
from asrlive.streaming._protocol import check_text, quote

from ._transport import Incoming, StreamTransport

if TYPE_CHECKING:
    from ._options import ServerOptions
    from ._websocket import ServerWebSocket

log = logging.getLogger("asrlive.server")

EVENTS_CHANNEL_ID = 0
# Events the data channel may hold unsent (aiortc holds them while the peer has not acknowledged
# what went before) before a send waits: then they wait in the connection's outbox, which drops
# superseded partials and gives up a peer that reads nothing, as it does for a WebSocket.
CHANNEL_BUFFER_BYTES = 64 * 1024
MAX_SDP_CHARS = 100_000
_DEAD_STATES = ("failed", "closed")


def parse_rtc_start(text: str) -> tuple[Start, str]:
    """A ``start`` message for WebRTC: the v1 fields but the audio format, plus ``sdp`` (the offer)."""
    message = decode_message(text)
    kind = message["type"]
    if kind == "offer":
        raise ProtocolError("not_started", 'send the offer in the "sdp" field of "start"')
    if kind != "start":
        raise ProtocolError("not_started", 'the first message must be "start" with the offer in "sdp"')
    fixed = sorted({"sample_rate", "encoding"} & set(message))
    if fixed:
        raise ProtocolError("bad_start", f"{fixed}: over WebRTC the audio format is negotiated in the SDP")
    sdp = message.pop("sdp", None)
    if not isinstance(sdp, str) or not sdp.strip():
        raise ProtocolError("bad_start", 'start needs "sdp": the SDP offer of the client\'s peer connection')
    # An SDP is lines of text (CRLF): a lone surrogate or a NUL is no offer, and aiortc should not
    # be the one to find out.
    check_text(sdp, "the offer", MAX_SDP_CHARS, "bad_sdp", multiline=True)
    return parse_start(message), sdp


def to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as mono float32 in [-1, 1] at the frame's rate."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    samples = data if frame.format.is_planar else data.reshape(-1, channels).T
    pcm = samples.astype(np.float32)
    if data.dtype.kind == "i":
        pcm /= float(2 ** (8 * data.dtype.itemsize - 1))
    mono: np.ndarray = pcm.mean(axis=0) if channels > 1 else pcm[0]
    return mono


class PeerConnections:
    """The WebRTC peer connections open now (a gauge in the metrics); each transport adds its own."""

    def __init__(self) -> None:
        self._open: set[RTCPeerConnection] = set()

    def add(self, pc: RTCPeerConnection) -> None:
        self._open.add(pc)

    def discard(self, pc: RTCPeerConnection) -> None:
        self._open.discard(pc)

    def __len__(self) -> int:
        return len(self._open)


class RtcTransport(StreamTransport):
    """One browser peer connection; ``peers`` is the server's set of open ones."""

    # ready waits for the data channel, which may take a while; the WebSocket is read by its own
    # task all along, so nothing would be gained by holding back the session's reads meanwhile.
    sends_ready_before_reading = False

    def __init__(self, ws: ServerWebSocket, options: ServerOptions, peers: PeerConnections) -> None:
        super().__init__(ws, options)
        self._peers = peers
        self._pc: RTCPeerConnection | None = None
        self._channel: RTCDataChannel | None = None
        self._items: asyncio.Queue[Incoming | BaseException] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = asyncio.Event()  # the data channel opened
        self._channel_low = asyncio.Event()  # the data channel holds less than CHANNEL_BUFFER_BYTES / 2
        self._dead = asyncio.Event()  # the peer connection failed or closed
        self._stopped = asyncio.Event()  # the session is ending: nothing more is read
        self._resampler: soxr.ResampleStream | None = None
        self._rate = 0
        self._samples_in = 0
        self._sdp = ""
        self._started = False

    def parse_start(self, text: str) -> Start:
        start, self._sdp = parse_rtc_start(text)
        return start

    async def open(self, start: Start) -> dict[str, Any]:
        self._pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only: no STUN
        self._peers.add(pc)
        pc.on("connectionstatechange", self._on_state)
        answer = await self._answer(pc)
        self._channel = pc.createDataChannel("events", negotiated=True, id=EVENTS_CHANNEL_ID)
        self._channel.on("open", self._opened.set)
        self._channel.bufferedAmountLowThreshold = CHANNEL_BUFFER_BYTES // 2
        self._channel.on("bufferedamountlow", self._channel_low.set)
        self._channel.on("close", lambda: self._lost("the events channel closed"))
        await self.ws.send(json.dumps({"type": "answer", "sdp": answer}))
        self._started = True
        return _codec_fields(answer)

    async def _answer(self, pc: RTCPeerConnection) -> str:
        tracks: list[MediaStreamTrack] = []
        pc.on("track", tracks.append)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(self._sdp, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises many types for offers it cannot parse or apply
            log.debug("bad offer", exc_info=True)
            # aiortc's messages may quote the offer: cut to a readable length.
            reason = quote(f"{type(exc).__name__}: {exc}", 200)
            raise ProtocolError("bad_sdp", f"the offer cannot be used: {reason}") from None
        audio = [track for track in tracks if track.kind == "audio"]
        if not audio or pc.sctp is None:
            raise ProtocolError("bad_sdp", "the offer needs an audio track (sendonly or sendrecv) and a data channel")
        self._tasks.append(asyncio.create_task(self._read_track(audio[0])))
        self._tasks.append(asyncio.create_task(self._read_ws()))
        return pc.localDescription.sdp

    def _on_state(self) -> None:
        assert self._pc is not None
        if self._pc.connectionState in _DEAD_STATES:
            self._lost(f"the WebRTC connection is {self._pc.connectionState}")

    def _lost(self, why: str) -> None:
        """The peer is gone: events can only go over the WebSocket, and the session ends (once)."""
        if not self._dead.is_set():
            self._dead.set()
            self._items.put_nowait(ProtocolError("rtc_failed", why))

    async def _read_track(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = cast(av.AudioFrame, await track.recv())  # an audio track's frames
                if not self._stopped.is_set():
                    self._items.put_nowait(self._convert(frame))
        except MediaStreamError:
            self._lost("the audio track ended")
        except ProtocolError as error:
            self._items.put_nowait(error)

    async def _read_ws(self) -> None:
        try:
            while True:
                message = await self.ws.recv()
                if isinstance(message, bytes):
                    message_or_error: Incoming | BaseException = ProtocolError(
                        "bad_message", "over WebRTC, audio goes over the peer connection, not the WebSocket"
                    )
                else:
                    message_or_error = message
                if not self._stopped.is_set():
                    self._items.put_nowait(message_or_error)
        except ConnectionClosed as closed:
            self._items.put_nowait(closed)

    def _convert(self, frame: av.AudioFrame) -> np.ndarray:
        pcm = to_mono(frame)
        if self._resampler is None:
            self._rate = frame.sample_rate
            self._resampler = soxr.ResampleStream(self._rate, SAMPLE_RATE, 1, dtype="float32")
        elif frame.sample_rate != self._rate:
            raise ProtocolError("bad_audio", f"the track's rate changed from {self._rate} to {frame.sample_rate} Hz")
        self._samples_in += pcm.size
        resampled: np.ndarray = self._resampler.resample_chunk(pcm)
        return resampled

    async def receive(self) -> Incoming:
        if not self._started:  # before start, only the WebSocket is there
            message = await self.ws.recv()
            if isinstance(message, bytes):
                raise ProtocolError("not_started", 'send a "start" message before any audio')
            return message
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail: np.ndarray = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return tail

    @property
    def seconds(self) -> float:
        return self._samples_in / self._rate if self._rate else 0.0

    async def send(self, text: str) -> None:
        if self._channel is not None and not any(e.is_set() for e in (self._opened, self._dead, self._stopped)):
            await _first(self._opened, self._dead, self._stopped)
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(text)
            if self._channel.bufferedAmount > CHANNEL_BUFFER_BYTES:
                self._channel_low.clear()
                await _first(self._channel_low, self._dead)
        else:
            await self.ws.send(text)

    def stop_receiving(self) -> None:
        self._stopped.set()
        if not self._started:
            super().stop_receiving()

    async def close(self, code: int, reason: str) -> None:
        """The client closes its peer connection once it has ``done``: wait for that (bounded), then close."""
        if self._channel is not None and self._channel.readyState == "open":
            try:
                await asyncio.wait_for(self._dead.wait(), self.options.close_timeout_s)
            except TimeoutError:
                log.info("the client kept its peer connection open after done; closing it")
        await super().close(code, reason)

    async def release(self) -> None:
        await super().release()
        # Cancelled, awaited and forgotten, and what was not read dropped: a cancelled task keeps its
        # CancelledError and a queued ConnectionClosed its traceback, whose frames hold this
        # transport (reference cycles: docs/deploy.md, Memory over time).
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        while not self._items.empty():
            self._items.get_nowait()
        if self._pc is not None:
            await self._pc.close()
            self._peers.discard(self._pc)


def _codec_fields(answer: str) -> dict[str, Any]:
    """The ``ready`` fields for the negotiated audio codec: its name and clock rate."""
    for media in SessionDescription.parse(answer).media:
        if media.kind == "audio" and media.rtp.codecs:
            codec = media.rtp.codecs[0]
            return {"sample_rate": codec.clockRate, "encoding": codec.name.lower()}
    raise ProtocolError("bad_sdp", "no audio codec in common")


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
