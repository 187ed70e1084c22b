"""Bad input against a real server: each gets its specific error and close code; nobody else notices."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect

from asrlive.engine import SAMPLE_RATE, DecodingOptions, StreamTranscriber

from .serving import (
    GAP,
    TIMEOUT,
    delayed_transcriber,
    eventually,
    offline_token_ids,
    pcm16,
    raw_session,
    running_server,
    start_message,
    stream_audio,
)

pytestmark = pytest.mark.asyncio

FINISH = json.dumps({"type": "finish"})


def bad_inputs(speech) -> dict[str, tuple[list, str, int]]:
    """name -> (messages, error code, close code)"""
    speech_bytes = pcm16(speech["goforward"])
    words = [speech_bytes[i : i + 3200] for i in range(0, len(speech_bytes), 3200)]  # 100 ms frames
    return {
        "malformed json": ([start_message()[:-1]], "bad_json", 4400),
        "not an object": (["[1, 2]"], "bad_message", 4400),
        "unknown type": ([json.dumps({"type": "hello"})], "unknown_type", 4400),
        "binary before start": (words[:1], "not_started", 4400),
        "finish before start": ([FINISH], "not_started", 4400),
        "wrong sample rate": ([start_message(sample_rate=4000)], "unsupported_sample_rate", 4400),
        "sample rate as text": ([start_message(sample_rate="16000")], "bad_start", 4400),
        "unknown encoding": ([start_message(encoding="mp3")], "unsupported_encoding", 4400),
        "unknown field": ([start_message(langauge="English")], "bad_start", 4400),
        "unknown language": ([start_message(language="Klingon")], "bad_start", 4400),
        "future protocol": ([start_message(protocol=2)], "unsupported_protocol", 4400),
        "odd byte count": ([start_message(), *words, words[0][:1001]], "bad_audio", 4400),
        "float NaN": ([start_message(encoding="pcm_f32le"), np.full(800, np.nan, "<f4").tobytes()], "bad_audio", 4400),
        "second start": ([start_message(), *words, start_message()], "already_started", 4400),
        "oversized frame": ([start_message(), *words, bytes(2 * 64_000)], "frame_too_large", 4400),
    }


@pytest.mark.parametrize(
    "name",
    [
        "malformed json",
        "not an object",
        "unknown type",
        "binary before start",
        "finish before start",
        "wrong sample rate",
        "sample rate as text",
        "unknown encoding",
        "unknown field",
        "unknown language",
        "future protocol",
        "odd byte count",
        "float NaN",
        "second start",
        "oversized frame",
    ],
)
async def test_bad_input_gets_its_error(load_model, speech, name):
    messages, code, close_code = bad_inputs(speech)[name]
    async with running_server(load_model("hf"), max_frame_bytes=64_000) as server:
        result = await raw_session(server.url, messages)
        metrics = server.metrics.exposition().decode()
    errors = result.of_type("error")
    assert [e["code"] for e in errors] == [code] and errors[0]["message"]
    assert result.close_code == close_code
    assert f'asrlive_errors_total{{code="{code}"}} 1.0' in metrics
    if result.types[0] == "ready":  # the session had started: what was heard still gets its final
        assert result.types[-1] == "done" and result.events[-1]["reason"] == code
        heard_speech = len([m for m in messages if isinstance(m, bytes)]) > 1
        assert len(result.of_type("final")) == heard_speech


async def test_far_oversized_message_is_cut_by_the_websocket_layer(load_model):
    async with running_server(load_model("hf"), max_frame_bytes=1000) as server:
        result = await raw_session(server.url, [start_message(), bytes(4001)])
    assert "error" not in result.types and result.close_code == 1009


async def test_idle_client_times_out_with_its_final(load_model, speech):
    async with running_server(load_model("hf"), idle_timeout_s=0.5) as server:
        result = await raw_session(server.url, [start_message(), pcm16(speech["goforward"])])
        silent = await raw_session(server.url, [])
    assert result.of_type("error")[0]["code"] == "idle_timeout" and result.close_code == 4408
    assert result.of_type("final") and result.types[-1] == "done"
    assert silent.of_type("error")[0]["code"] == "idle_timeout" and silent.close_code == 4408


async def test_session_length_limit(load_model, speech):
    clip = speech["librivox-0870"]
    async with running_server(load_model("hf"), max_session_s=2.0) as server:
        result = await raw_session(server.url, [start_message(), pcm16(clip[: 3 * SAMPLE_RATE]), FINISH])
    assert result.of_type("error")[0]["code"] == "session_too_long" and result.close_code == 4413
    assert result.of_type("final")[-1]["end"] <= 2.1 and result.types[-1] == "done"


async def test_bad_clients_do_not_disturb_a_running_session(load_model, speech):
    """A bystander streams in real time while every bad input and a vanishing client come and go."""
    model = load_model("hf")
    clip = np.concatenate([speech["librivox-0870"], np.zeros(SAMPLE_RATE, np.float32), speech["cards-004"]])
    async with running_server(model, max_frame_bytes=64_000) as server:
        bystander = asyncio.create_task(stream_audio(server.url, clip, pace=0.03, language="English"))
        for messages, _, _ in bad_inputs(speech).values():
            await raw_session(server.url, messages)
        async with ws_connect(server.url, open_timeout=TIMEOUT) as ws:  # vanishes mid-utterance
            await ws.send(start_message())
            await ws.send(pcm16(speech["two-cities"][: 4 * SAMPLE_RATE]))
            await asyncio.wait_for(ws.recv(), TIMEOUT)  # ready
            ws.transport.abort()
        result = await asyncio.wait_for(bystander, TIMEOUT)
        await eventually(lambda: not server.scheduler.streams)  # the vanished client's state is dropped
    assert result.close_code == 1000 and not result.of_type("error")
    finals = result.of_type("final")
    assert len(finals) == 2
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, clip, final, DecodingOptions(language="English"))


class FailingTranscriber(StreamTranscriber):
    """An engine that breaks on a stream whose context says so."""

    def transcribe_steps(self, segment, audio, final):
        if self.options.context == "break":
            raise RuntimeError("simulated engine failure")
        return (yield from super().transcribe_steps(segment, audio, final))


async def test_an_engine_failure_ends_only_its_own_session(load_model, speech):
    model = load_model("hf")
    clip = speech["librivox-0880"]
    async with running_server(model, FailingTranscriber) as server:
        broken, healthy = await asyncio.gather(
            stream_audio(server.url, clip, pace=0.01, context="break"), stream_audio(server.url, clip, pace=0.01)
        )
    assert broken.of_type("error")[0]["code"] == "internal_error" and broken.close_code == 1011
    assert broken.events[-1]["type"] == "done" and broken.events[-1]["reason"] == "internal_error"
    assert healthy.close_code == 1000 and not healthy.of_type("error")
    for final in healthy.of_type("final"):
        assert final["token_ids"] == offline_token_ids(model, clip, final, DecodingOptions())


async def test_finals_that_keep_coming_are_waited_for_past_the_drain_timeout(load_model, speech):
    """Four utterances arrive at once, then ``finish``: their finals need over 0.8 s in all, more than the
    drain timeout, but the engine (0.2 s more per job: overloaded) completes work every 0.2 s or so,
    so none is given up."""
    model = load_model("hf")
    parts = [speech[name] for name in ("goforward", "cards-003", "cards-004", "librivox-0880")]
    clip = np.concatenate([x for part in parts for x in (part, GAP)])
    async with running_server(model, delayed_transcriber(0.2), drain_timeout_s=0.6) as server:
        result = await stream_audio(server.url, clip, partials=False)
    finals = result.of_type("final")
    assert len(finals) == 4 and result.events[-1]["reason"] == "finish" and result.close_code == 1000
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, clip, final, DecodingOptions())


async def test_a_stuck_engine_ends_the_wait_for_finals_after_the_drain_timeout(load_model, speech, caplog):
    """The engine hangs for 3 s on its job: stuck, as far as a 0.5 s drain timeout knows."""
    clip = np.concatenate([speech["goforward"], GAP])
    async with running_server(load_model("hf"), delayed_transcriber(3.0), drain_timeout_s=0.5) as server:
        began = time.monotonic()
        result = await stream_audio(server.url, clip, partials=False)
        waited = time.monotonic() - began
    assert not result.of_type("final") and result.events[-1]["reason"] == "finish" and result.close_code == 1000
    assert waited < 2.5  # the session did not wait for the stuck job
    assert "the engine completed nothing for 0.5 s; closing without the last finals" in caplog.text
