"""The live client against a real server: finals, transcript files, and a connection dropped mid-utterance."""

from __future__ import annotations

import asyncio
import html
import json
import socket

import numpy as np
import pytest
import soundfile
import srt
import webvtt

from asrlive.clients import LiveOptions, LiveStream, StreamFailed, Transcript, connect
from asrlive.clients._live import AudioBuffer
from asrlive.clients._sources import MicrophoneError, file_chunks
from asrlive.clients._transcript import split_cues, timestamp
from asrlive.engine import SAMPLE_RATE, DecodingOptions

from .serving import GAP, TIMEOUT, DroppingProxy, eventually, offline_token_ids, running_server, stream_audio
from .test_cli_serve import _asrlive


@pytest.fixture(scope="module")
def dialogue(speech) -> np.ndarray:
    """Three utterances with pauses: long enough to cut a connection in the middle of one."""
    parts = [speech["librivox-0870"], GAP, speech["librivox-0920"], GAP, speech["goforward"], GAP]
    return np.concatenate(parts)


async def _paced(audio: np.ndarray, pace_s: float, on_chunk=None):
    """100 ms chunks, ``pace_s`` apart: ten times real time at 0.01."""
    async for chunk in file_chunks(audio, realtime=False):
        if on_chunk is not None:
            on_chunk()
        await asyncio.sleep(pace_s)
        yield chunk


def _assert_exact_and_disjoint(finals: list[dict], model, audio: np.ndarray, options: DecodingOptions) -> None:
    for final in finals:
        assert final["token_ids"] == offline_token_ids(model, audio, final, options)
    for before, after in zip(finals, finals[1:], strict=False):
        assert before["end"] <= after["start"]  # no audio transcribed twice


@pytest.mark.asyncio
async def test_uninterrupted_stream_gives_the_offline_finals(load_model, dialogue, tmp_path):
    model = load_model("hf")
    events: list[dict] = []
    async with running_server(model) as server:
        live = LiveStream(LiveOptions(server.url, language="English"), events.append)
        await asyncio.wait_for(live.run(_paced(dialogue, 0.0)), TIMEOUT)
    finals = [e for e in events if e["type"] == "final"]
    assert live.sessions == 1 and len(finals) == 3 and events[-1]["type"] == "done"
    assert [e["state"] for e in events if e["type"] == "status"] == ["connecting", "listening"]
    _assert_exact_and_disjoint(finals, model, dialogue, DecodingOptions(language="English"))

    transcript = Transcript()
    for final in finals:
        transcript.add(final)
    _assert_files_parse(transcript, finals, tmp_path)


def _assert_files_parse(transcript: Transcript, finals: list[dict], tmp_path) -> None:
    spoken = [f for f in finals if " ".join(f["text"].split())]
    for suffix in (".txt", ".srt", ".vtt", ".jsonl"):
        transcript.write(tmp_path / f"out{suffix}")
    assert (tmp_path / "out.txt").read_text().splitlines() == [" ".join(f["text"].split()) for f in spoken]
    # Subtitles: each final in cues short enough to read (clients/_transcript.split_cues).
    expected = [cue for f in spoken for cue in split_cues(f["text"], f["start"], f["end"])]
    cues = list(srt.parse((tmp_path / "out.srt").read_text()))
    assert [c.content for c in cues] == ["\n".join(cue.lines) for cue in expected]
    assert [round(c.start.total_seconds(), 3) for c in cues] == [round(cue.start, 3) for cue in expected]
    assert cues[0].start.total_seconds() == pytest.approx(spoken[0]["start"], abs=1e-3)
    captions = webvtt.read(str(tmp_path / "out.vtt"))
    assert [html.unescape(c.raw_text) for c in captions] == ["\n".join(cue.lines) for cue in expected]
    assert [c.start for c in captions] == [timestamp(cue.start, ".") for cue in expected]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["token_ids"] for r in records] == [f["token_ids"] for f in finals]


@pytest.mark.asyncio
async def test_a_dropped_connection_loses_no_final_and_resends_no_final_audio(load_model, dialogue):
    """The connection is cut while the second utterance is being spoken. The client reconnects and
    resends exactly the audio after the last final it received: the new session's audio is the
    rest of the capture from there (checked by the server's count), every final is the offline
    transcription of its span of the capture, and the spans never overlap."""
    model = load_model("hf")
    events: list[dict] = []
    async with running_server(model) as server, DroppingProxy(server.port) as proxy:

        def on_event(event: dict) -> None:
            events.append(event)
            heard = {(e["type"], e.get("segment")) for e in events}
            second_begun = {("final", 0), ("speech_started", 1)} <= heard and ("final", 1) not in heard
            if second_begun and proxy.connections == 1:
                proxy.drop()  # mid-utterance: its speech has started, its final has not come

        live = LiveStream(LiveOptions(proxy.url(), retry_delays_s=(0.05,)), on_event)
        await asyncio.wait_for(live.run(_paced(dialogue, 0.01)), TIMEOUT)
    assert live.sessions == 2
    states = [e["state"] for e in events if e["type"] == "status"]
    assert states == ["connecting", "listening", "reconnecting", "connecting", "listening"]
    cut = states.index("reconnecting")
    statuses = [i for i, e in enumerate(events) if e["type"] == "status"]
    finals_before = [e for e in events[: statuses[cut]] if e["type"] == "final"]
    assert len(finals_before) == 1  # the first utterance's; the second was cut short
    assert live.session_starts == [0, round(finals_before[0]["end"] * SAMPLE_RATE)]
    done = events[-1]
    assert done["type"] == "done" and done["reason"] == "finish"
    assert done["audio_seconds"] == (dialogue.size - live.session_starts[1]) / SAMPLE_RATE
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 3
    _assert_exact_and_disjoint(finals, model, dialogue, DecodingOptions())


@pytest.mark.asyncio
async def test_a_full_server_is_waited_out_and_a_bad_token_is_final(load_model, speech):
    model = load_model("hf")
    clip = speech["goforward"]
    events: list[dict] = []
    async with running_server(model, max_sessions=1, token="secret") as server:
        with pytest.raises(StreamFailed, match="unauthorized"):
            await LiveStream(LiveOptions(server.url, token="wrong"), events.append).run(_paced(clip, 0.0))
        waiting = LiveStream(LiveOptions(server.url, token="secret", retry_delays_s=(0.05,)), events.append)
        async with connect(server.url, token="secret", timeout=TIMEOUT) as holder:  # the only session
            task = asyncio.create_task(waiting.run(_paced(clip, 0.0)))
            await eventually(lambda: any(e.get("state") == "retrying" for e in events))
            await holder.close()
        await asyncio.wait_for(task, TIMEOUT)
    retrying = [e for e in events if e.get("state") == "retrying"]
    assert "server_full" in retrying[0]["reason"]
    assert events[-1]["type"] == "done" and events[-1]["reason"] == "finish"


def test_audio_buffer_keeps_what_no_final_covers():
    buffer = AudioBuffer(max_samples=1000)
    buffer.append(np.arange(300, dtype=np.float32))
    buffer.append(np.arange(300, 600, dtype=np.float32))
    buffer.release(250)
    assert buffer.base == 250 and buffer.read(400).tolist() == list(range(400, 600))
    buffer.append(np.arange(600, 1400, dtype=np.float32))  # 1150 kept would exceed 1000
    assert buffer.lost == 150 and buffer.base == 400 and buffer.read(0)[:2].tolist() == [400, 401]
    assert buffer.read(550).tolist() == list(range(550, 1400))  # across chunks
    buffer.sent = 1400  # a connected session has sent everything: an overflow now loses nothing
    buffer.append(np.arange(1400, 1500, dtype=np.float32))
    assert buffer.lost == 150 and buffer.base == 500 and buffer.read(0).tolist() == list(range(500, 1500))


def test_timestamps_in_both_caption_formats():
    assert timestamp(3661.5, ",") == "01:01:01,500"
    assert timestamp(59.9996, ".") == "00:01:00.000"


@pytest.mark.asyncio
async def test_stream_command_prints_and_writes_the_servers_finals(load_model, dialogue, tmp_path):
    wav, output = tmp_path / "dialogue.wav", tmp_path / "dialogue.vtt"
    soundfile.write(wav, dialogue, SAMPLE_RATE, subtype="FLOAT")
    async with running_server(load_model("hf")) as server:
        expected = await stream_audio(server.url, dialogue, language="English")
        command = [*_asrlive(), "stream", str(wav), "--server", server.url, "--language", "English"]
        out, err, code = await _run(*command, "--output", str(output))
    finals = [f for f in expected.of_type("final") if " ".join(f["text"].split())]
    assert code == 0, err
    assert out.splitlines() == [" ".join(f["text"].split()) for f in finals]
    cues = [cue for f in finals for cue in split_cues(f["text"], f["start"], f["end"])]
    assert [html.unescape(c.raw_text) for c in webvtt.read(str(output))] == ["\n".join(cue.lines) for cue in cues]


@pytest.mark.asyncio
async def test_stream_command_gives_up_on_an_unreachable_server(speech, tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{probe.getsockname()[1]}/v1/stream"
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, speech["goforward"], SAMPLE_RATE)
    out, err, code = await _run(*_asrlive(), "stream", str(wav), "--server", url)
    assert code == 1 and out == ""
    assert "gave up after 5 attempts: cannot reach" in err


async def _run(*command: str) -> tuple[str, str, int]:
    pipes = {"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE}
    process = await asyncio.create_subprocess_exec(*command, **pipes)
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode is not None
    return out.decode(), err.decode(), process.returncode


@pytest.mark.asyncio
async def test_a_failing_source_gets_the_finals_of_what_it_captured_then_its_error(load_model, speech):
    clip = np.concatenate([speech["goforward"], GAP])

    async def unplugged():
        async for chunk in _paced(clip, 0.0):
            yield chunk
        raise MicrophoneError("the device went away")

    events: list[dict] = []
    async with running_server(load_model("hf")) as server:
        with pytest.raises(MicrophoneError, match="went away"):
            await asyncio.wait_for(LiveStream(LiveOptions(server.url), events.append).run(unplugged()), TIMEOUT)
    assert [e["type"] for e in events if e["type"] in ("final", "done")] == ["final", "done"]
    assert events[-1]["reason"] == "finish"


def test_a_final_with_blank_lines_stays_one_cue(tmp_path):
    transcript = Transcript()
    transcript.add({"start": 0.5, "end": 1.25, "text": " one\n\ntwo ", "language": None, "token_ids": [1]})
    transcript.add({"start": 2.0, "end": 2.5, "text": " \n", "language": None, "token_ids": [2]})
    transcript.add({"start": 3.0, "end": 4.0, "text": "three", "language": None, "token_ids": [3]})
    cues = list(srt.parse(transcript.srt()))
    assert [(c.content, c.start.total_seconds(), c.end.total_seconds()) for c in cues] == [
        ("one two", 0.5, 1.25),
        ("three", 3.0, 4.0),
    ]
    assert [c.text for c in webvtt.from_string(transcript.vtt())] == ["one two", "three"]
    assert transcript.txt() == "one two\nthree\n"
    assert [json.loads(line)["token_ids"] for line in transcript.jsonl().splitlines()] == [[1], [2], [3]]
