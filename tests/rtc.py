"""Helpers for WebRTC tests: a Python aiortc peer that acts as the browser, ICE kept on loopback,
and a record of the audio each session was fed (what the server heard, after decoding)."""

from __future__ import annotations

import asyncio
import fractions
import ipaddress
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aioice.ice
import av
import numpy as np
import soxr
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from asrlive.engine import SAMPLE_RATE
from asrlive.web import RTC_PATH

from .serving import TIMEOUT, server_metric

RTC_RATE = 48_000
FRAME = RTC_RATE // 50  # 20 ms, as browsers send


def open_sessions(server) -> float:
    """The server's asrlive_open_sessions gauge, as /metrics exposes it."""
    return server_metric(server, "asrlive_open_sessions")


def restrict_ice_to_loopback(monkeypatch) -> None:
    """Test machines may send traffic to loopback addresses only: aioice offers 127.0.0.1 as its host
    candidate (it never offers loopback by itself) and ignores a peer's non-loopback candidates.
    Served for real, the server offers every interface's address."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    add = aioice.ice.Connection.add_remote_candidate

    async def add_loopback_only(self, candidate) -> None:
        if candidate is None or ipaddress.ip_address(candidate.host).is_loopback:
            await add(self, candidate)

    monkeypatch.setattr(aioice.ice.Connection, "add_remote_candidate", add_loopback_only)


class ArrayTrack(MediaStreamTrack):
    """A microphone that says ``audio`` (16 kHz float) in real time, then stays silent: 48 kHz mono
    16-bit frames of 20 ms. ``spoken`` is set once the audio is out."""

    kind = "audio"

    def __init__(self, audio: np.ndarray) -> None:
        super().__init__()
        pcm = soxr.resample(audio, SAMPLE_RATE, RTC_RATE)
        self._pcm = (np.clip(pcm, -1, 32767 / 32768) * 32768).round().astype(np.int16)
        self._sent = 0
        self._start: float | None = None
        self.spoken = asyncio.Event()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._sent / RTC_RATE - time.monotonic()))  # real-time pace
        chunk = self._pcm[self._sent : self._sent + FRAME]
        if chunk.size < FRAME:
            self.spoken.set()
            chunk = np.concatenate([chunk, np.zeros(FRAME - chunk.size, np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RTC_RATE
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, RTC_RATE)
        self._sent += FRAME
        return frame


@dataclass
class RtcPeer:
    """The client side of a WebRTC session: peer connection, events channel, signalling WebSocket."""

    pc: RTCPeerConnection
    track: ArrayTrack
    ws: ClientConnection | None = None
    events: list[dict] = field(default_factory=list)
    over_websocket: list[dict] = field(default_factory=list)  # the events that came over the WebSocket
    done: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def offer(cls, audio: np.ndarray) -> tuple[RtcPeer, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = ArrayTrack(audio)
        pc.addTransceiver(track, direction="sendonly")
        peer = cls(pc, track)
        channel = pc.createDataChannel("events", negotiated=True, id=0)
        channel.on("message", lambda text: peer.received(json.loads(text)))
        await asyncio.wait_for(pc.setLocalDescription(await pc.createOffer()), TIMEOUT)
        return peer, pc.localDescription.sdp

    def received(self, event: dict) -> None:
        self.events.append(event)
        if event["type"] == "done":
            self.done.set()

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def connect(self, url: str, **start) -> None:
        """Signal: start with the offer; the answer (or an error) comes back on the WebSocket."""
        self.ws = await ws_connect(url, open_timeout=TIMEOUT)
        sdp = start.pop("sdp", self.pc.localDescription.sdp)
        await self.ws.send(json.dumps({"type": "start", "protocol": 1, "sdp": sdp, **start}))
        self.reader = asyncio.create_task(self._read_websocket())

    async def _read_websocket(self) -> None:
        assert self.ws is not None
        try:
            async for text in self.ws:
                message = json.loads(text)
                if message["type"] == "answer":
                    await self.pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "answer"))
                else:
                    self.over_websocket.append(message)
                    self.received(message)
        except ConnectionClosed:
            pass

    async def finish(self) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps({"type": "finish"}))

    async def closed(self) -> int | None:
        """Wait for the server's close; the page closes its peer connection on ``done``, so does this."""
        assert self.ws is not None
        await asyncio.wait_for(self.done.wait(), TIMEOUT)
        await self.pc.close()
        await asyncio.wait_for(self.ws.wait_closed(), TIMEOUT)
        return self.ws.close_code

    async def vanish(self) -> None:
        """Go away without a word: the peer connection and the WebSocket's TCP connection just end."""
        await self.pc.close()
        if self.ws is not None:
            self.ws.transport.abort()


def rtc_url(server) -> str:
    return f"ws://127.0.0.1:{server.port}{RTC_PATH}"


def record_received_audio(monkeypatch) -> dict[str, list[np.ndarray]]:
    """Session id -> the 16 kHz blocks each protocol v1 session (``/v1/stream``, ``/v1/rtc``) was
    fed on the server, in order (after decoding and resampling)."""
    from asrlive.streaming._v1 import StreamProtocol

    heard: dict[str, list[np.ndarray]] = defaultdict(list)
    feed = StreamProtocol._feed

    def recording_feed(self: StreamProtocol, pcm: np.ndarray) -> list:
        heard[self.id].append(pcm.copy())
        return feed(self, pcm)

    monkeypatch.setattr(StreamProtocol, "_feed", recording_feed)
    return heard
