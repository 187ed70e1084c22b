"""One session lifecycle (web/_connection.py), the same tests against every session endpoint:
``/v1/stream`` (protocol v1 over a WebSocket), ``/v1/rtc`` (protocol v1, audio as a WebRTC track)
and ``/v1/realtime`` (OpenAI Realtime transcription). A small client per endpoint speaks; results
are compared with offline transcription (v1) or ``/v1/stream``'s finals (Realtime) of the audio the
server was fed."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import socket
import time

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from asrlive.engine import SAMPLE_RATE, DecodingOptions, StreamTranscriber
from asrlive.streaming._realtime import RealtimeSession
from asrlive.web import _rtc, _server
from asrlive.web._http import HttpLimits

from .rtc import RtcPeer, record_received_audio, rtc_url
from .serving import (
    GAP,
    TIMEOUT,
    eventually,
    non_reading_session,
    offline_token_ids,
    pcm16,
    running_server,
    server_metric,
    slowed_forwards_transcriber,
    start_message,
    stream_audio,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("loopback_ice")]
ENDPOINTS = ["stream", "rtc", "realtime"]
RATE_24K = 24_000
COMPLETED = "conversation.item.input_audio_transcription.completed"


@pytest.fixture
def fed(monkeypatch) -> dict[str, list[np.ndarray]]:
    """The 16 kHz audio each session was fed on the server: v1 by its ``ready`` session id,
    Realtime by its ``session.created`` session id."""
    heard = record_received_audio(monkeypatch)
    feed = RealtimeSession._feed

    def recording_feed(self: RealtimeSession, pcm: np.ndarray, event_id):
        heard[self.id].append(pcm.copy())
        return feed(self, pcm, event_id)

    monkeypatch.setattr(RealtimeSession, "_feed", recording_feed)
    return heard


# -- one client per endpoint ---------------------------------------------------------------------


class Client:
    """One session: ``open``, ``speak`` (all the audio, at ``pace`` s per 100 ms), ``finish`` (v1),
    ``ended`` (until the server's close). ``events``, ``close_code``, ``close_reason``."""

    endpoint = ""

    def __init__(self, server, audio: np.ndarray, fed: dict[str, list[np.ndarray]]) -> None:
        self.server, self.audio, self.fed = server, audio, fed
        self.events: list[dict] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.ws = None
        self._reader: asyncio.Task | None = None

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                self.events.append(json.loads(text))
        except ConnectionClosed:
            pass

    async def ended(self) -> Client:
        await asyncio.wait_for(self._reader, TIMEOUT)
        await asyncio.wait_for(self.ws.wait_closed(), TIMEOUT)
        self.close_code, self.close_reason = self.ws.close_code, self.ws.close_reason
        return self

    @property
    def heard(self) -> np.ndarray:
        return np.concatenate(self.fed[self.session_id])


class StreamClient(Client):
    endpoint = "stream"

    async def open(self, **start) -> None:
        self.ws = await ws_connect(self.server.url, open_timeout=TIMEOUT, max_size=None)
        await self.ws.send(start_message(**start))
        self._reader = asyncio.create_task(self._read())
        await eventually(lambda: self.events)
        assert self.events[0]["type"] == "ready", self.events
        self.session_id = self.events[0]["session"]

    async def speak(self, pace: float = 0.0) -> None:
        try:
            for begin in range(0, self.audio.size, SAMPLE_RATE // 10):
                await self.ws.send(pcm16(self.audio[begin : begin + SAMPLE_RATE // 10]))
                await asyncio.sleep(pace)
        except ConnectionClosed:
            pass  # the server ended the session: its events say why

    async def finish(self) -> None:
        await self.ws.send(json.dumps({"type": "finish"}))

    def results(self) -> list:
        return [final["token_ids"] for final in self.of_type("final")]

    async def reference(self, model) -> list:
        """Offline transcription of each final's span of the audio the session was fed."""
        language = self.events[0]["language"]
        options = DecodingOptions(language=language)
        return [offline_token_ids(model, self.heard, final, options) for final in self.of_type("final")]


class RtcClient(StreamClient):
    """An aiortc peer (tests/rtc.py): the audio is a real-time track, events come over the data channel."""

    endpoint = "rtc"

    async def open(self, **start) -> None:
        self.peer, _ = await RtcPeer.offer(self.audio)
        self.events = self.peer.events
        await self.peer.connect(rtc_url(self.server), **start)
        self.ws = self.peer.ws
        await eventually(lambda: self.events)
        assert self.events[0]["type"] == "ready", self.events
        self.session_id = self.events[0]["session"]

    async def speak(self, pace: float = 0.0) -> None:
        await asyncio.wait_for(self.peer.track.spoken.wait(), TIMEOUT)  # a microphone: real time

    async def ended(self) -> Client:
        await asyncio.wait_for(self.peer.reader, TIMEOUT)  # the WebSocket closed
        await self.peer.pc.close()
        self.close_code, self.close_reason = self.ws.close_code, self.ws.close_reason
        return self


class RealtimeClient(Client):
    """A raw WebSocket client of ``/v1/realtime``: default turn detection (server_vad), 24 kHz pcm16 appends."""

    endpoint = "realtime"

    async def open(self, **start) -> None:
        url = f"ws://127.0.0.1:{self.server.port}/v1/realtime?intent=transcription"
        self.ws = await ws_connect(url, open_timeout=TIMEOUT, max_size=None)
        self._reader = asyncio.create_task(self._read())
        await eventually(lambda: self.events)
        assert self.events[0]["type"] == "session.created", self.events
        self.session_id = self.events[0]["session"]["id"]

    async def speak(self, pace: float = 0.0) -> None:
        try:
            for chunk in realtime_appends(self.audio):
                await self.ws.send(chunk)
                await asyncio.sleep(pace)
        except ConnectionClosed:
            pass

    async def finish(self) -> None:
        raise AssertionError("a Realtime session has no finish")

    def results(self) -> list:
        return [event["transcript"] for event in self.of_type(COMPLETED)]

    async def reference(self, model) -> list:
        """``/v1/stream``'s finals for the audio the session was fed (on a server of its own; as
        float32 samples: 16-bit frames would round them, and move a VAD decision or a near tie)."""
        async with running_server(model) as server:
            result = await stream_audio(server.url, self.heard, encoding="pcm_f32le")
        return [final["text"] for final in result.of_type("final")]


CLIENTS = {client.endpoint: client for client in (StreamClient, RtcClient, RealtimeClient)}


def realtime_appends(audio: np.ndarray) -> list[str]:
    """16 kHz audio as Realtime ``input_audio_buffer.append`` events of 100 ms of 24 kHz pcm16."""
    pcm = pcm16(soxr.resample(audio, SAMPLE_RATE, RATE_24K))
    step = RATE_24K // 10 * 2
    return [
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})
        for i in range(0, len(pcm), step)
    ]


async def session(endpoint: str, server, audio: np.ndarray, fed, **start) -> Client:
    client = CLIENTS[endpoint](server, audio, fed)
    await asyncio.wait_for(client.open(**({} if endpoint == "realtime" else start)), TIMEOUT)
    return client


def utterances(speech, names: list[str], tail: bool = True) -> np.ndarray:
    """Half a second of silence, then the clips with a pause after each (none after the last if not ``tail``)."""
    parts = [GAP[:8000]]
    for name in names:
        parts += [speech[name], GAP]
    return np.concatenate(parts if tail else parts[:-1])


async def assert_results_are_the_reference(client: Client, model, count: int | None = None) -> None:
    results = client.results()
    assert results and (count is None or len(results) == count), client.events
    assert results == await client.reference(model)


# -- 1. a client that reads nothing ----------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_client_that_reads_nothing_is_given_up(endpoint, load_model, speech, fed, monkeypatch):
    # Small buffers everywhere (the HTTP layer's, the sockets', the data channel's, the outbox) so
    # that the tiny model's short messages fill them in seconds.
    monkeypatch.setattr(_server, "HttpLimits", functools.partial(HttpLimits, write_buffer_bytes=1024))
    monkeypatch.setattr(_rtc, "CHANNEL_BUFFER_BYTES", 1024)
    model = load_model("hf")
    # A Realtime commit alone is four events of about 1 KB, queued at once: a bound above that.
    bound = 4096 if endpoint == "realtime" else 1024
    async with running_server(model, max_outbox_bytes=bound) as server:
        for listener in server._sockets:  # accepted sockets inherit it
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        if endpoint == "rtc":
            deaf = await session(
                endpoint, server, utterances(speech, ["cards-001", "goforward"] * 3), fed, partial_interval_ms=100
            )

            async def ignore(chunk) -> None:
                return None

            deaf.peer.pc.sctp._receive_data_chunk = ignore  # its SCTP takes (and acknowledges) nothing more
        else:
            talk = utterances(speech, ["cards-001", "goforward"] * (36 if endpoint == "stream" else 12))
            if endpoint == "stream":
                frames = [pcm16(talk[i : i + SAMPLE_RATE]) for i in range(0, talk.size, SAMPLE_RATE)]
                messages = [start_message(partial_interval_ms=100), *frames]
                writer = await non_reading_session(server.port, "/v1/stream", messages)
            else:
                writer = await non_reading_session(
                    server.port, "/v1/realtime?intent=transcription", realtime_appends(talk)
                )
        normal = await session(endpoint, server, utterances(speech, ["goforward", "cards-001"]), fed)
        await normal.speak(pace=0.01)
        if endpoint == "realtime":
            await eventually(lambda: len(normal.of_type(COMPLETED)) == 2)
            await eventually(lambda: server_metric(server, "asrlive_slow_clients_total") == 1)
            assert server_metric(server, "asrlive_open_sessions") == 1  # the normal one
            await server.shutdown()
        else:
            await normal.finish()
        await normal.ended()
        await eventually(lambda: server_metric(server, "asrlive_slow_clients_total") == 1)
        await eventually(lambda: server_metric(server, "asrlive_open_sessions") == 0)
        if endpoint == "rtc":
            await eventually(lambda: not server.peers)
            await deaf.peer.vanish()
        else:
            writer.transport.abort()
    assert server_metric(server, "asrlive_slow_clients_total") == 1
    assert normal.close_code == (1001 if endpoint == "realtime" else 1000)
    if endpoint != "realtime":
        assert normal.events[-1]["type"] == "done" and normal.events[-1]["reason"] == "finish"
    await assert_results_are_the_reference(normal, model, 2)


# -- 2. the drain waits while the engine makes progress ---------------------------------------------

# Every forward of the engine takes 0.1 s more: a round completes every 0.1 s or so (progress), while
# one utterance's job takes 6 (cards-001) to 16 (goforward) forwards of the tiny model, well over
# DRAIN_TIMEOUT_S. A drain that gave up after DRAIN_TIMEOUT_S in all would lose the last finals.
FORWARD_DELAY_S = 0.1
DRAIN_TIMEOUT_S = 0.5


async def _end(client: Client, server) -> float:
    """End the session the endpoint's way (v1: finish; Realtime: the server's shutdown); the seconds
    from then until the close."""
    began = time.monotonic()
    if client.endpoint == "realtime":
        await asyncio.wait_for(server.shutdown(), TIMEOUT)
    else:
        await client.finish()
    await client.ended()
    return time.monotonic() - began


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_drain_under_overload_delivers_every_result(endpoint, load_model, speech, fed):
    model = load_model("hf")
    slow = slowed_forwards_transcriber(FORWARD_DELAY_S)
    audio = utterances(speech, ["goforward", "cards-001", "goforward"], tail=False)  # the last one open
    async with running_server(model, slow, drain_timeout_s=DRAIN_TIMEOUT_S) as server:
        client = await session(endpoint, server, audio, fed)
        await client.speak()
        if endpoint == "realtime":  # the open utterance is in: the last one has started
            await eventually(lambda: len(client.of_type("input_audio_buffer.speech_started")) == 3)
        draining = await _end(client, server)
    assert draining > 2 * DRAIN_TIMEOUT_S, "nothing was queued: the test shows nothing"
    await assert_results_are_the_reference(client, model, 3)
    if endpoint == "realtime":
        assert (client.close_code, client.close_reason) == (1001, "shutdown")
    else:
        assert client.events[-1]["type"] == "done" and client.events[-1]["reason"] == "finish"
        assert client.events[-1]["segments"] == 3 and client.close_code == 1000


class BrokenEngine(StreamTranscriber):
    """An engine whose every job fails."""

    def transcribe_steps(self, segment, audio, final):
        raise RuntimeError("simulated engine failure")
        yield  # a generator, as the real one


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_an_engine_failure_ends_the_session_with_internal_error(endpoint, load_model, speech, fed):
    async with running_server(load_model("hf"), BrokenEngine) as server:
        client = await session(endpoint, server, utterances(speech, ["cards-001", "goforward"]), fed)
        if endpoint == "realtime":  # manual commits: the item is committed before its job runs (and fails)
            update = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
            await client.ws.send(json.dumps({"type": "session.update", "session": update}))
            await client.speak()
            await client.ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        else:
            await client.speak(pace=0.01)
        await client.ended()
        await eventually(lambda: server_metric(server, "asrlive_open_sessions") == 0)
        assert server_metric(server, 'asrlive_errors_total{code="internal_error"}') == 1
    assert (client.close_code, client.close_reason) == (1011, "internal_error")
    if endpoint == "realtime":  # every committed item is told it failed
        committed = [e["item_id"] for e in client.of_type("input_audio_buffer.committed")]
        failed = [e["item_id"] for e in client.of_type(COMPLETED.replace("completed", "failed"))]
        assert len(committed) == 1 and failed == committed and not client.of_type(COMPLETED)
    else:
        errors = client.of_type("error")
        assert [e["code"] for e in errors] == ["internal_error"] and not client.of_type("final")
        assert client.events[-1]["type"] == "done" and client.events[-1]["reason"] == "internal_error"


# -- 3. max_session_s ------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_session_past_max_session_s_ends_with_the_results_of_its_audio(endpoint, load_model, speech, fed):
    model = load_model("hf")
    audio = utterances(speech, ["cards-001", "goforward"])  # 6.8 s; goforward from 2.8 s to 5.6 s
    async with running_server(model, max_session_s=4.0) as server:
        client = await session(endpoint, server, audio, fed)
        speaking = asyncio.create_task(client.speak())
        await client.ended()
        await asyncio.wait_for(speaking, TIMEOUT)
    types = [e["type"] for e in client.events]
    errors = client.of_type("error")
    assert len(errors) == 1, client.events
    after = types[types.index("error") + 1 :]
    if endpoint == "realtime":
        assert errors[0]["error"]["code"] == "session_expired"
        assert (client.close_code, client.close_reason) == (1000, "session_expired")
        assert client.heard.size >= 4 * SAMPLE_RATE
    else:
        assert errors[0]["code"] == "session_too_long"
        assert set(after[:-1]) <= {"final", "speech_stopped"} and after[-1] == "done"
        assert client.events[-1]["reason"] == "session_too_long" and client.close_code == 4413
        assert client.heard.size == 4 * SAMPLE_RATE
    await assert_results_are_the_reference(client, model, 2)  # the second one cut at the limit


# -- 4. lag in /readyz -----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_lagging_session_makes_readyz_answer_lagging_until_it_ends(endpoint, load_model, speech, fed):
    from .test_readiness import probe

    model = load_model("hf")
    slow = slowed_forwards_transcriber(FORWARD_DELAY_S)
    async with running_server(model, slow, max_lag_s=0.5) as server:
        client = await session(
            endpoint, server, utterances(speech, ["goforward", "goforward"]), fed, partial_interval_ms=100
        )
        speaking = asyncio.create_task(client.speak(pace=0.01))
        await eventually(lambda: server.admission.worst_lag() > 0.5)
        status, body = await probe(server, "/readyz")
        assert status == 503 and body["status"] == "lagging" and body["lag_seconds"] > 0.5
        assert server_metric(server, "asrlive_lag_seconds") > 0.5
        await asyncio.wait_for(speaking, TIMEOUT)
        if endpoint == "realtime":
            await client.ws.close()  # a Realtime client ends its session by going
        else:
            await client.finish()
        await client.ended()
        await eventually(lambda: server_metric(server, "asrlive_open_sessions") == 0)
        assert await probe(server, "/readyz") == (
            200,
            {"status": "ready", "sessions": 0, "max_sessions": 16, "lag_seconds": 0.0},
        )


# -- 5. the session's log line ---------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_session_logs_one_line_at_its_end(endpoint, load_model, speech, fed, caplog):
    """v1: ended by ``finish``; Realtime: the client closes its WebSocket, as Realtime clients end."""
    async with running_server(load_model("hf")) as server:
        with caplog.at_level(logging.INFO, logger="asrlive.server"):
            client = await session(endpoint, server, utterances(speech, ["cards-001"]), fed)
            await client.speak()
            if endpoint == "realtime":
                await eventually(lambda: client.of_type(COMPLETED))
                await client.ws.close()
            else:
                await client.finish()
            await client.ended()
            await eventually(lambda: server_metric(server, "asrlive_open_sessions") == 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "asrlive.server" and r.levelno == logging.INFO]
    ended = [line for line in lines if " ended: " in line]
    assert len(ended) == 1, lines
    reason = "the client went away" if endpoint == "realtime" else "finish"
    assert ended[0].endswith(f"ended: {reason}") and ": 127.0.0.1:" in ended[0]
    if endpoint != "realtime":
        assert ended[0].startswith(f"{client.session_id}: ")
    assert f", {len(client.results())} finals," in ended[0]


# -- 6. shutdown drains every endpoint ---------------------------------------------------------------


async def test_shutdown_drains_a_session_of_every_endpoint(load_model, speech, fed, caplog):
    model = load_model("hf")
    audio = utterances(speech, ["cards-001", "goforward"], tail=False)  # ends mid-utterance
    async with running_server(model) as server:
        clients = {endpoint: await session(endpoint, server, audio, fed) for endpoint in ENDPOINTS}
        await asyncio.gather(clients["stream"].speak(), clients["realtime"].speak())
        started = {"stream": "speech_started", "rtc": "speech_started", "realtime": "input_audio_buffer.speech_started"}
        await eventually(lambda: all(len(c.of_type(started[e])) == 2 for e, c in clients.items()))
        with caplog.at_level(logging.INFO, logger="asrlive.server"):
            await asyncio.wait_for(server.shutdown(), TIMEOUT)
            for client in clients.values():
                await client.ended()
    for endpoint, client in clients.items():
        await assert_results_are_the_reference(client, model, 2)
        assert client.close_code == 1001, endpoint
        if endpoint != "realtime":
            assert client.events[-1]["type"] == "done" and client.events[-1]["reason"] == "shutdown"
            assert client.events[-1]["segments"] == 2
    ended = [r.getMessage() for r in caplog.records if " ended: " in r.getMessage()]
    assert len(ended) == 3 and all(line.endswith("ended: shutdown") for line in ended), ended
