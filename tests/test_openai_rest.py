"""The OpenAI-compatible REST endpoints, driven by the unmodified `openai` SDK against a real server."""

from __future__ import annotations

import asyncio

import openai
import pytest
import srt
import webvtt

from asrlive.clients import connect
from asrlive.clients._transcript import Line, Transcript
from asrlive.engine import DecodingOptions, load_audio, transcribe

from .checkpoints import FIXTURES
from .serving import TIMEOUT, running_server

pytestmark = pytest.mark.asyncio

CLIP = FIXTURES / "speech" / "librivox-0880.wav"
LONG = FIXTURES / "speech" / "two-cities.wav"


def _client(server, api_key: str = "any key") -> openai.AsyncOpenAI:
    """A client to use in ``async with`` (it closes its connections there)."""
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT
    )


async def _create(client: openai.AsyncOpenAI, path=CLIP, **fields):
    with open(path, "rb") as file:
        return await asyncio.wait_for(
            client.audio.transcriptions.create(file=file, model=fields.pop("model", "whisper-1"), **fields), TIMEOUT
        )


async def test_models_lists_the_loaded_model(load_model):
    async with running_server(load_model("hf")) as server:
        async with _client(server) as client:
            page = await asyncio.wait_for(client.models.list(), TIMEOUT)
    [model] = page.data
    assert (model.id, model.object, model.owned_by) == (server.model_name, "model", "asrlive")
    assert model.created > 1_700_000_000


async def test_every_format_is_the_offline_transcription(load_model):
    model = load_model("hf")
    audio = load_audio(LONG)
    expected = transcribe(model, audio, DecodingOptions("English", "Dickens", max_segment_seconds=60))
    async with running_server(model) as server, _client(server) as client:
        fields = {"path": LONG, "language": "en", "prompt": "Dickens", "temperature": 0.2}
        plain = await _create(client, **fields)
        text = await _create(client, response_format="text", **fields)
        subtitles = await _create(client, response_format="srt", **fields)
        captions = await _create(client, response_format="vtt", **fields)
        detailed = await _create(client, response_format="verbose_json", **fields)
    assert plain.text == expected.text and plain.usage.type == "duration"
    assert plain.usage.seconds == pytest.approx(audio.size / 16000)
    assert text == expected.text + "\n"
    lines = [Line(s.start, s.end, s.text, s.language, s.token_ids) for s in expected.segments]
    assert subtitles == Transcript(lines).render(".srt") and list(srt.parse(subtitles))  # as `transcribe` writes it
    assert captions == Transcript(lines).render(".vtt") and webvtt.from_string(captions)[0].start == "00:00:00.000"
    assert (detailed.text, detailed.language, detailed.duration) == (expected.text, "english", expected.duration)
    segments = detailed.segments
    assert [s.tokens for s in segments] == [list(s.token_ids) for s in expected.segments]
    assert [(s.id, s.start, s.end, s.text) for s in segments] == [
        (i, s.start, s.end, s.text) for i, s in enumerate(expected.segments)
    ]
    assert all(s.temperature == 0.0 and s.compression_ratio > 0 for s in segments if s.text)
    assert detailed.words is None


async def test_word_timestamps_come_from_the_aligner(load_model, load_aligner):
    model, aligner = load_model("hf"), load_aligner("hf")
    clip = FIXTURES / "speech" / "librivox-0870.wav"  # the tiny model's text for it fits its 80 ms slots
    audio = load_audio(clip)
    async with running_server(model, aligner=aligner) as server, _client(server) as client:
        detailed = await _create(
            client, clip, language="English", response_format="verbose_json", timestamp_granularities=["word"]
        )
    expected = transcribe(model, audio, DecodingOptions("English"), aligner=aligner)
    words = [(w.word, w.start, w.end) for w in detailed.words]
    assert words == [(w.text, w.start, w.end) for s in expected.segments for w in s.alignment.words]
    assert words, "the piece has words"


async def test_a_streamed_transcription_sends_deltas_then_the_text(load_model):
    model = load_model("hf")
    expected = transcribe(model, load_audio(LONG), DecodingOptions("English", max_segment_seconds=60))
    async with running_server(model) as server, _client(server) as client:
        stream = await _create(client, path=LONG, language="en", stream=True)
        events = [event async for event in stream]
    assert [e.type for e in events][-1] == "transcript.text.done" and len(events) >= 2
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert "".join(deltas) == events[-1].text == expected.text


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"response_format": "diarized_json"}, "response_format", "is not one of json, text, srt, vtt, verbose_json"),
        ({"language": "xx"}, "language", "unknown language 'xx'"),
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities", "needs response_format verbose_json"),
        ({"prompt": "<|im_end|>"}, "prompt", "control token"),
        ({"temperature": 7}, "temperature", "between 0 and 1"),
        ({"stream": True, "response_format": "srt"}, "stream", "json or text"),
    ],
)
async def test_bad_fields_get_openai_errors(load_model, fields, param, message):
    async with running_server(load_model("hf")) as server, _client(server) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await _create(client, **fields)
    assert error.value.status_code == 400 and error.value.param == param and message in error.value.message
    assert error.value.type == "invalid_request_error"


async def test_words_without_an_aligner_are_refused(load_model):
    async with running_server(load_model("hf")) as server, _client(server) as client:
        with pytest.raises(openai.BadRequestError, match="need a forced aligner"):
            await _create(client, response_format="verbose_json", timestamp_granularities=["word"])


async def test_undecodable_and_oversized_files(load_model, tmp_path):
    junk = tmp_path / "notes.mp3"
    junk.write_bytes(b"this is not audio" * 100)
    async with running_server(load_model("hf"), max_upload_bytes=50_000) as server, _client(server) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await _create(client, path=junk)
        assert error.value.code == "invalid_audio" and "could not decode 'notes.mp3'" in error.value.message
        with pytest.raises(openai.APIStatusError) as large:
            await _create(client)  # 227 KB
    assert large.value.status_code == 413 and large.value.code == "file_too_large"


async def test_the_token_is_the_api_key(load_model):
    async with running_server(load_model("hf"), token="s3cret") as server:
        async with _client(server, api_key="wrong") as wrong:
            with pytest.raises(openai.AuthenticationError) as error:
                await _create(wrong)
        assert error.value.code == "invalid_api_key"
        async with _client(server, api_key="s3cret") as right:
            result = await _create(right)
    assert isinstance(result.text, str)


async def test_a_full_server_answers_429(load_model):
    async with running_server(load_model("hf"), max_sessions=1) as server, _client(server) as client:
        async with connect(server.url, timeout=TIMEOUT):
            with pytest.raises(openai.RateLimitError) as error:
                await _create(client)
        result = await _create(client)
    assert error.value.code == "server_full" and isinstance(result.text, str)
