"""The WebSocket service against real servers on loopback: sessions, concurrency, limits, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

import numpy as np
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from asrlive.clients import SessionRefused, connect
from asrlive.engine import SAMPLE_RATE, DecodingOptions
from asrlive.web import RTC_PATH

from .serving import (
    GAP,
    TIMEOUT,
    delayed_transcriber,
    eventually,
    metric,
    offline_token_ids,
    raw_session,
    running_server,
    start_message,
    stream_audio,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def talk(speech) -> np.ndarray:
    """Three real utterances with pauses between them."""
    return np.concatenate([speech["cards-001"], GAP, speech["goforward"], GAP, speech["cards-003"], GAP])


def _http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def get(server, path: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    return await asyncio.wait_for(asyncio.to_thread(_http_get, url), TIMEOUT)


async def test_a_session_gets_the_offline_finals(load_model, talk):
    model = load_model("hf")
    async with running_server(model) as server:
        result = await stream_audio(server.url, talk, pace=0.02, language="English", context="cards")
        _, _, metrics = await get(server, "/metrics")
    assert result.types[0] == "ready" and result.types[-1] == "done" and result.close_code == 1000
    finals = result.of_type("final")
    assert [f["segment"] for f in finals] == [0, 1, 2]
    options = DecodingOptions(language="English", context="cards")
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, talk, final, options)
    # Per segment: started, partials, stopped (a partial computed meanwhile may follow), final.
    for segment in range(3):
        mine = [e["type"] for e in result.events if e.get("segment") == segment]
        assert mine[0] == "speech_started" and mine[-1] == "final" and mine.count("speech_stopped") == 1
        assert set(mine[mine.index("speech_stopped") + 1 :]) <= {"partial", "final"}
    partials = result.of_type("partial")
    assert partials and all(p["stable"] + p["unstable"] == p["text"] for p in partials)
    done = result.events[-1]
    assert done == {"type": "done", "reason": "finish", "audio_seconds": talk.size / SAMPLE_RATE, "segments": 3}
    assert "asrlive_final_latency_seconds_count 3.0" in metrics
    assert metric(metrics, "asrlive_audio_seconds_total") == pytest.approx(talk.size / SAMPLE_RATE)


async def test_concurrent_sessions_get_their_own_results(load_model, speech):
    model = load_model("hf")
    setups = [
        (speech["librivox-0870"], {}),
        (speech["cards-002"], {"language": "German", "context": "Karten"}),
        (speech["two-cities"][: 9 * SAMPLE_RATE], {"language": "English"}),
        (speech["goforward"], {"context": "NASA"}),
    ]
    async with running_server(model) as server:
        results = await asyncio.gather(*(stream_audio(server.url, audio, pace=0.01, **s) for audio, s in setups))
        _, _, metrics = await get(server, "/metrics")
    answers = set()
    for (audio, start), result in zip(setups, results, strict=True):
        assert result.close_code == 1000
        options = DecodingOptions(language=start.get("language"), context=start.get("context", ""))
        for final in result.of_type("final"):
            assert final["token_ids"] == offline_token_ids(model, audio, final, options)
            answers.add(tuple(final["token_ids"]))
    assert len(answers) >= len(setups), "the sessions' answers differ from each other"
    streams, batches = metric(metrics, "asrlive_batch_streams_sum"), metric(metrics, "asrlive_batch_streams_count")
    assert streams > batches, "some batches held more than one stream"


async def test_full_server_refuses_then_admits(load_model, speech):
    async with running_server(load_model("hf"), max_sessions=1) as server:
        async with connect(server.url, timeout=TIMEOUT) as first:
            with pytest.raises(SessionRefused) as refused:
                async with connect(server.url, timeout=TIMEOUT):
                    pass
            assert refused.value.code == "server_full" and refused.value.close_code == 1013
            status, _, body = await get(server, "/healthz")
            assert status == 200 and json.loads(body)["sessions"] == 1
            await first.finish()
            assert [e["type"] async for e in first] == ["done"]
        result = await stream_audio(server.url, speech["goforward"])
        assert result.close_code == 1000 and result.of_type("final")
        _, _, metrics = await get(server, "/metrics")
        assert 'asrlive_sessions_refused_total{code="server_full"} 1.0' in metrics


async def test_overload_warns_and_refuses_new_sessions_but_keeps_every_final(load_model, talk):
    model = load_model("hf")
    async with running_server(model, delayed_transcriber(0.4), max_lag_s=0.5, lag_warning_s=0.5) as server:
        streaming = asyncio.create_task(stream_audio(server.url, talk, pace=0.01, partial_interval_ms=100))
        refusal = None
        for _ in range(200):
            await asyncio.sleep(0.05)
            if server.admission.worst_lag() > 0.5:
                with pytest.raises(SessionRefused) as refusal:
                    async with connect(server.url, timeout=TIMEOUT):
                        pass
                break
        result = await asyncio.wait_for(streaming, TIMEOUT)
    assert refusal is not None and refusal.value.code == "server_busy" and refusal.value.close_code == 1013
    lags = result.of_type("lag")
    assert lags and all(lag["seconds"] > 0.5 for lag in lags)
    finals = result.of_type("final")
    assert [f["segment"] for f in finals] == [0, 1, 2]
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, talk, final, DecodingOptions())


async def test_token_is_checked(load_model, speech):
    clip = speech["goforward"]
    async with running_server(load_model("hf"), token="s3cret") as server:
        for token_kwargs, url in [({}, server.url), ({"token": "wrong"}, server.url)]:
            with pytest.raises(SessionRefused) as refused:
                async with connect(url, timeout=TIMEOUT, **token_kwargs):
                    pass
            assert refused.value.code == "unauthorized" and refused.value.close_code == 4401
        by_header = await stream_audio(server.url, clip, token="s3cret")
        by_query = await stream_audio(server.url + "?token=s3cret", clip)
    assert by_header.close_code == by_query.close_code == 1000
    assert by_header.of_type("final") == by_query.of_type("final") != []


async def test_health_metrics_and_unknown_paths(load_model):
    async with running_server(load_model("hf")) as server:
        status, content_type, body = await get(server, "/healthz")
        assert status == 200 and content_type == "application/json"
        assert json.loads(body) | {"version": None} == {
            "status": "ok",
            "version": None,
            "protocol": 1,
            "model": server.model_name,
            "aligner": None,
            "sessions": 0,
            "max_sessions": 16,
        }
        status, content_type, body = await get(server, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        for name in ("asrlive_open_sessions", "asrlive_real_time_factor", "asrlive_partial_latency_seconds_bucket"):
            assert name in body
        status, _, body = await get(server, "/nope")
        assert status == 404 and "/v1/stream" in body
        for path in ("/healthz/", "/v1/stream/"):  # no redirects
            assert (await get(server, path))[0] == 404


async def test_plain_http_on_the_websocket_paths_and_handshakes_elsewhere(load_model, caplog):
    async with running_server(load_model("hf")) as server:
        for path in ("/v1/stream", "/v1/rtc"):
            status, content_type, body = await get(server, path)
            assert status == 426 and content_type == "text/plain; charset=utf-8" and "WebSocket" in body
        for path in ("/v2/stream", "/healthz"):
            with pytest.raises(InvalidStatus) as refused:
                await ws_connect(f"ws://127.0.0.1:{server.port}{path}", open_timeout=TIMEOUT)
            assert refused.value.response.status_code == 404 and b"/v1/stream" in refused.value.response.body
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_routes_can_be_added(load_model):
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hello {request.query_params['name']}")

    async with running_server(load_model("hf")) as server:
        server.add_routes([Route("/v1/hello", hello)])
        assert await get(server, "/v1/hello?name=asr") == (200, "text/plain; charset=utf-8", "hello asr")
        assert (await get(server, "/healthz"))[0] == 200


FINISH = json.dumps({"type": "finish"})


async def test_allowed_origins(load_model, caplog):
    """With a list, a browser's handshake from another origin is refused (403) before any session;
    the listed origins, the server's own page and clients that send no Origin are served."""
    allowed = ("https://captions.example", "http://localhost:8765")
    async with running_server(load_model("hf"), allowed_origins=allowed) as server:
        for url in (server.url, server.url.replace("/v1/stream", RTC_PATH)):
            with pytest.raises(InvalidStatus) as refused:
                await ws_connect(url, origin="https://elsewhere.example", open_timeout=TIMEOUT)
            assert refused.value.response.status_code == 403
        own_page = f"http://127.0.0.1:{server.port}"
        served = [
            await raw_session(server.url, [start_message(), FINISH], origin=origin)
            for origin in (None, *allowed, own_page)
        ]
    assert [r.events[0]["session"] for r in served] == ["s1", "s2", "s3", "s4"]  # the refusals were no sessions
    assert all(r.types == ["ready", "done"] and r.close_code == 1000 for r in served)
    async with running_server(load_model("hf")) as server:  # no list: any origin
        anywhere = await raw_session(server.url, [start_message(), FINISH], origin="https://elsewhere.example")
    assert anywhere.types == ["ready", "done"]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_shutdown_delivers_the_finals_of_open_sessions(load_model, speech):
    model = load_model("hf")
    server_ctx = running_server(model)
    server = await server_ctx.__aenter__()
    clips = [speech["librivox-0870"][: 5 * SAMPLE_RATE], speech["librivox-0920"][: 4 * SAMPLE_RATE]]  # mid-sentence
    sessions = [asyncio.create_task(stream_audio(server.url, clip, pace=0.005, finish=False)) for clip in clips]
    await eventually(lambda: server.metrics.audio_seconds._value.get() >= 8.0)  # well into both utterances
    await asyncio.wait_for(server.shutdown(), TIMEOUT)
    results = await asyncio.wait_for(asyncio.gather(*sessions), TIMEOUT)
    await server_ctx.__aexit__(None, None, None)
    for clip, result in zip(clips, results, strict=True):
        assert result.close_code == 1001 and result.events[-1]["reason"] == "shutdown"
        finals = result.of_type("final")
        assert finals and len(finals) == len(result.of_type("speech_started"))
        assert result.of_type("speech_stopped")[-1]["reason"] == "finish"
        for final in finals:
            assert final["token_ids"] == offline_token_ids(model, clip, final, DecodingOptions())
