"""`/v1/realtime` against a real server, through the unmodified `openai` SDK's realtime client and an
`openai-agents` voice pipeline's speech-to-text session: transcripts equal `/v1/stream`'s finals."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import openai
import pytest
import soxr
from agents.voice import StreamedAudioInput, STTModelSettings
from agents.voice.models.openai_stt import OpenAISTTModel

from .serving import GAP, TIMEOUT, running_server, stream_audio

pytestmark = pytest.mark.asyncio
RATE = 24_000
CHUNK = RATE // 10  # 100 ms


@pytest.fixture(scope="module")
def talk(speech) -> np.ndarray:
    """Three utterances with pauses, as 24 kHz 16-bit samples (what a Realtime client sends)."""
    audio = np.concatenate([speech["cards-001"], GAP, speech["goforward"], GAP, speech["cards-003"], GAP])
    return np.round(np.clip(soxr.resample(audio, 16_000, RATE), -1, 32767 / 32768) * 32768).astype(np.int16)


def _client(server, api_key: str = "key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key, max_retries=0)


async def _stream_finals(server, talk: np.ndarray) -> list[str]:
    """What the asrlive protocol gives for the same 24 kHz bytes."""
    result = await stream_audio(server.url, talk, language="English", sample_rate=RATE)
    return [final["text"] for final in result.of_type("final")]


async def _transcribe(server, talk: np.ndarray, session: dict, expected: int) -> list:
    events = []
    async with _client(server).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        await connection.session.update(session=session)
        for begin in range(0, talk.size, CHUNK):
            await connection.input_audio_buffer.append(audio=base64.b64encode(talk[begin : begin + CHUNK]).decode())
        if session["audio"]["input"].get("turn_detection") is None:
            await connection.input_audio_buffer.commit()
        async for event in connection:
            events.append(event)
            completed = [e for e in events if e.type.endswith("input_audio_transcription.completed")]
            committed = [e for e in events if e.type == "input_audio_buffer.committed"]
            if committed and len(completed) == len(committed) and len(committed) >= expected:
                break
    return events


def _session(turn_detection: dict | None) -> dict:
    transcription = {"model": "gpt-4o-transcribe", "language": "en"}
    audio = {"format": {"type": "audio/pcm", "rate": RATE}, "transcription": transcription}
    return {"type": "transcription", "audio": {"input": {**audio, "turn_detection": turn_detection}}}


async def test_server_vad_items_are_the_stream_finals(load_model, talk):
    async with running_server(load_model("hf")) as server:
        finals = await asyncio.wait_for(_stream_finals(server, talk), TIMEOUT)
        events = await asyncio.wait_for(_transcribe(server, talk, _session({"type": "server_vad"}), 3), TIMEOUT)
    types = [e.type for e in events]
    assert types[:2] == ["session.created", "session.updated"]
    assert types.count("input_audio_buffer.speech_started") == types.count("input_audio_buffer.speech_stopped") == 3
    completed = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert [e.transcript for e in completed] == finals
    for item in completed:
        deltas = [e.delta for e in events if e.type.endswith("transcription.delta") and e.item_id == item.item_id]
        assert "".join(deltas) == item.transcript
    assert len({e.event_id for e in events}) == len(events)


async def test_manual_commits_make_one_item(load_model, talk):
    async with running_server(load_model("hf")) as server:
        events = await asyncio.wait_for(_transcribe(server, talk, _session(None), 1), TIMEOUT)
    [committed] = [e for e in events if e.type == "input_audio_buffer.committed"]
    [completed] = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert completed.item_id == committed.item_id and isinstance(completed.transcript, str)
    assert not [e for e in events if e.type == "input_audio_buffer.speech_started"]


async def test_an_append_may_carry_megabytes(load_model, speech):
    """44 s in one append (2.8 MB of base64): over /v1/stream's 1 MiB, within the SDK's 15 MiB."""
    pcm = np.round(soxr.resample(speech["two-cities"], 16_000, RATE) * 32767).astype(np.int16)
    async with running_server(load_model("hf")) as server, _client(server) as client:
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
            await connection.session.update(session=_session(None))
            await connection.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
            await connection.input_audio_buffer.commit()
            completed = await asyncio.wait_for(
                _next(connection, "conversation.item.input_audio_transcription.completed"), TIMEOUT
            )
    assert completed.transcript


async def test_an_empty_commit_is_an_error_that_keeps_the_session(load_model):
    async with running_server(load_model("hf")) as server:
        async with _client(server).realtime.connect(extra_query={"intent": "transcription"}) as connection:
            await connection.send({"type": "input_audio_buffer.commit", "event_id": "mine-1"})
            error = await asyncio.wait_for(_next(connection, "error"), TIMEOUT)
            await connection.send({"type": "input_audio_buffer.clear"})
            cleared = await asyncio.wait_for(_next(connection, "input_audio_buffer.cleared"), TIMEOUT)
    assert error.error.code == "input_audio_buffer_commit_empty" and error.error.event_id == "mine-1"
    assert cleared.type == "input_audio_buffer.cleared"


async def _next(connection, kind: str):
    async for event in connection:
        if event.type == kind:
            return event
    raise AssertionError(f"no {kind}")


async def test_the_token_is_checked_at_the_handshake(load_model):
    async with running_server(load_model("hf"), token="s3cret") as server:
        with pytest.raises(Exception) as refused:
            async with _client(server, "wrong").realtime.connect(extra_query={"intent": "transcription"}):
                pass
        async with _client(server, "s3cret").realtime.connect(extra_query={"intent": "transcription"}) as connection:
            created = await asyncio.wait_for(_next(connection, "session.created"), TIMEOUT)
    assert "401" in str(refused.value) and created.session.type == "transcription"


async def test_an_openai_agents_voice_pipeline_transcribes_its_turns(load_model, talk):
    async with running_server(load_model("hf")) as server:
        finals = await asyncio.wait_for(_stream_finals(server, talk), TIMEOUT)
        model = OpenAISTTModel("gpt-4o-transcribe", _client(server))
        audio = StreamedAudioInput()
        settings = STTModelSettings(language="en", turn_detection={"type": "server_vad"})
        session = await model.create_session(audio, settings, False, False)
        for begin in range(0, talk.size, CHUNK):
            await audio.add_audio(talk[begin : begin + CHUNK])
        await audio.add_audio(None)

        async def turns() -> list[str]:
            return [turn async for turn in session.transcribe_turns()]

        transcripts = await asyncio.wait_for(turns(), TIMEOUT)
        await session.close()
    assert transcripts == [text for text in finals if text]
