"""WebRTC ingress (/v1/rtc) against a real server, with a Python aiortc peer in the browser's place:
the same session machinery as the WebSocket path, bad signalling, peers that vanish."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from asrlive.engine import SAMPLE_RATE, DecodingOptions
from asrlive.web import _rtc

from .rtc import RtcPeer, open_sessions, rtc_url
from .serving import (
    GAP,
    TIMEOUT,
    eventually,
    offline_token_ids,
    raw_session,
    running_server,
    server_metric,
    stream_audio,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("loopback_ice")]


async def test_a_webrtc_session_gets_the_finals_of_what_it_sent(load_model, two_utterances, heard):
    model = load_model("hf")
    async with running_server(model) as server:
        peer, _ = await RtcPeer.offer(two_utterances)
        await peer.connect(rtc_url(server), language="English")
        await asyncio.wait_for(peer.track.spoken.wait(), TIMEOUT)
        await peer.finish()
        close_code = await peer.closed()
        await eventually(lambda: not server.peers)
        metrics = server.metrics.exposition().decode()
    assert close_code == 1000 and not peer.over_websocket  # every event came over the data channel
    ready = peer.events[0]
    assert ready["type"] == "ready" and ready["language"] == "English"
    assert (ready["encoding"], ready["sample_rate"]) == ("opus", 48000)
    finals = peer.of_type("final")
    assert len(finals) >= 2 and [f["segment"] for f in finals] == list(range(len(finals)))
    audio = np.concatenate(heard[ready["session"]])
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, audio, final, DecodingOptions(language="English"))
    done = peer.events[-1]
    assert done["type"] == "done" and done["reason"] == "finish" and done["segments"] == len(finals)
    # What was in flight when finish overtook it on the WebSocket is not heard: a few frames.
    assert done["audio_seconds"] == pytest.approx(two_utterances.size / SAMPLE_RATE, abs=0.5)
    assert "asrlive_sessions_total 1.0" in metrics and "asrlive_peer_connections 0.0" in metrics


async def _offer_sdp(speech, audio: bool = True) -> str:
    """An offer from a real peer (closed again: nobody answers it), with or without an audio track."""
    if audio:
        peer, sdp = await RtcPeer.offer(speech["goforward"])
        await peer.pc.close()
        return sdp
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("events", negotiated=True, id=0)
    await asyncio.wait_for(pc.setLocalDescription(await pc.createOffer()), TIMEOUT)
    await pc.close()
    return pc.localDescription.sdp


def _start(**fields) -> str:
    return json.dumps({"type": "start", **fields})


@pytest.mark.parametrize(
    "name, code",
    [
        ("offer before start", "not_started"),
        ("binary before start", "not_started"),
        ("start without sdp", "bad_start"),
        ("start with an audio format", "bad_start"),
        ("sdp that is not sdp", "bad_sdp"),
        ("offer without audio", "bad_sdp"),
    ],
)
async def test_bad_signalling_gets_its_error(load_model, speech, name, code):
    sdp = await _offer_sdp(speech, audio=name != "offer without audio")
    messages = {
        "offer before start": [json.dumps({"type": "offer", "sdp": sdp})],
        "binary before start": [bytes(3200)],
        "start without sdp": [_start(language="en")],
        "start with an audio format": [_start(sdp=sdp, sample_rate=48000)],
        "sdp that is not sdp": [_start(sdp="v=0\r\nthis is not an offer\r\n")],
        "offer without audio": [_start(sdp=sdp)],
    }[name]
    async with running_server(load_model("hf")) as server:
        result = await raw_session(rtc_url(server), messages)
        await eventually(lambda: not server.peers)
    assert [e["type"] for e in result.events] == ["error"]
    assert result.events[0]["code"] == code and result.events[0]["message"]
    assert result.close_code == 4400


async def test_audio_on_the_signalling_socket_is_refused_with_events_on_the_websocket(load_model, speech):
    """The client never completes ICE, so the data channel never opens: every event, the error and
    ``done`` included, comes over the WebSocket instead."""
    sdp = await _offer_sdp(speech)
    async with running_server(load_model("hf")) as server:
        result = await raw_session(rtc_url(server), [_start(sdp=sdp), bytes(3200)])
        await eventually(lambda: not server.peers)
    assert result.types == ["answer", "ready", "error", "done"]
    assert result.events[2]["code"] == "bad_message"
    assert result.events[3]["reason"] == "bad_message" and result.close_code == 4400


async def test_a_vanishing_peer_is_forgotten_and_a_bystander_does_not_notice(load_model, speech, two_utterances):
    model = load_model("hf")
    async with running_server(model) as server:
        bystander = asyncio.create_task(stream_audio(server.url, two_utterances, pace=0.1, language="English"))
        peer, _ = await RtcPeer.offer(np.concatenate([speech["librivox-0870"], GAP]))
        await peer.connect(rtc_url(server))
        await eventually(lambda: peer.of_type("speech_started"))  # mid-utterance
        await peer.vanish()
        result = await asyncio.wait_for(bystander, TIMEOUT)
        await eventually(lambda: not server.peers and open_sessions(server) == 0)
    assert result.close_code == 1000 and len(result.of_type("final")) == 2
    options = DecodingOptions(language="English")
    for final in result.of_type("final"):
        assert final["token_ids"] == offline_token_ids(model, two_utterances, final, options)


async def test_a_lost_peer_connection_ends_the_session_with_its_finals_on_the_websocket(load_model, speech, heard):
    model = load_model("hf")
    async with running_server(model) as server:
        peer, _ = await RtcPeer.offer(np.concatenate([speech["librivox-0870"], GAP]))
        await peer.connect(rtc_url(server))
        await eventually(lambda: peer.of_type("speech_started"))
        await peer.pc.close()  # the WebSocket stays open
        await asyncio.wait_for(peer.reader, TIMEOUT)
        await eventually(lambda: not server.peers)
    types = [e["type"] for e in peer.over_websocket]
    assert types[0] == "error" and peer.over_websocket[0]["code"] == "rtc_failed"
    assert "final" in types and types[-1] == "done" and peer.events[-1]["reason"] == "rtc_failed"
    assert peer.ws is not None and peer.ws.close_code == 4410
    audio = np.concatenate(heard[peer.events[0]["session"]])
    for final in peer.of_type("final"):
        assert final["token_ids"] == offline_token_ids(model, audio, final, DecodingOptions())


async def test_a_full_server_refuses_webrtc_before_any_peer_connection(load_model, speech):
    sdp = await _offer_sdp(speech)
    async with running_server(load_model("hf"), max_sessions=1) as server:
        peer, _ = await RtcPeer.offer(speech["goforward"])
        await peer.connect(rtc_url(server))
        await eventually(lambda: peer.events and peer.events[0]["type"] == "ready")
        refused = await raw_session(rtc_url(server), [_start(sdp=sdp)])
        assert len(server.peers) == 1
        await peer.finish()
        assert await peer.closed() == 1000
    assert [(e["type"], e["code"]) for e in refused.events] == [("error", "server_full")]
    assert refused.close_code == 1013


async def test_a_peer_that_reads_nothing_is_given_up(load_model, speech, monkeypatch):
    """A peer whose data channel stops taking events (its SCTP delivers and acknowledges no more
    data): the channel's buffer fills, then the connection's outbox, and the session is given up
    like a WebSocket client that reads nothing, its peer connection closed."""
    monkeypatch.setattr(_rtc, "CHANNEL_BUFFER_BYTES", 1024)  # small buffers: full in seconds
    talk = np.concatenate([speech["cards-001"], GAP, speech["goforward"], GAP] * 3)
    async with running_server(load_model("hf"), max_outbox_bytes=1024) as server:
        peer, _ = await RtcPeer.offer(talk)
        await peer.connect(rtc_url(server), partial_interval_ms=100)
        await eventually(lambda: peer.of_type("ready"))  # over the open data channel

        async def deaf(chunk) -> None:
            return None

        peer.pc.sctp._receive_data_chunk = deaf
        await eventually(lambda: server_metric(server, "asrlive_slow_clients_total") == 1)
        await eventually(lambda: not server.peers and open_sessions(server) == 0)
        await peer.vanish()
