"""Word timestamps where transcripts are made: `transcribe --timestamps` (offline and --stream) and
live finals of a server with an aligner, each equal to aligning that piece's audio and text alone."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import numpy as np
import pytest
import soundfile
import srt
import webvtt

from asrlive.cli import main
from asrlive.clients import SessionRefused, connect
from asrlive.engine import SAMPLE_RATE, DecodingOptions, transcribe

from .checkpoints import FIXTURES
from .serving import GAP, TIMEOUT, running_server, stream_audio

LONG = FIXTURES / "speech" / "two-cities.wav"


def _get_json(server, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=TIMEOUT) as response:
        return json.loads(response.read())


def _piece(audio: np.ndarray, record: dict) -> np.ndarray:
    return audio[round(record["start"] * SAMPLE_RATE) : round(record["end"] * SAMPLE_RATE)]


def _expected_words(aligner, audio: np.ndarray, record: dict) -> list[dict] | None:
    """What aligning the piece alone gives, on the file's or stream's clock."""
    alignment = aligner.alignment(_piece(audio, record), record["text"], record["language"])
    shifted = alignment.shifted(record["start"])
    return None if shifted.words is None else [word.to_json() for word in shifted.words]


def test_offline_pieces_carry_their_words(checkpoints, aligners, load_model, load_aligner, speech, capsys):
    args = ["transcribe", str(LONG), "--model", str(checkpoints["hf"]), "--dtype", "float32", "--language", "en"]
    args += ["--max-segment-seconds", "16", "--timestamps", "--aligner", str(aligners["original"])]
    assert main([*args, "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)
    audio = speech["two-cities"]
    segments = record["segments"]
    expected = transcribe(load_model("hf"), audio, DecodingOptions("en", max_segment_seconds=16))
    assert len(segments) == len(expected.segments) >= 3
    assert [s["token_ids"] for s in segments] == [list(s.token_ids) for s in expected.segments]
    for segment in segments:
        assert segment["words"] == _expected_words(load_aligner("hf"), audio, segment)
    timed = [segment for segment in segments if segment["words"]]
    assert timed, "at least one piece was aligned"
    assert record["words"] == [word for segment in timed for word in segment["words"]]
    assert all(segment["start"] <= word["start"] for segment in timed for word in segment["words"])


def test_streamed_finals_carry_their_words_and_subtitles_use_them(
    checkpoints, aligners, load_aligner, two_utterances, tmp_path, capsys
):
    clip = tmp_path / "two.wav"
    soundfile.write(clip, two_utterances, SAMPLE_RATE, subtype="FLOAT")
    args = ["transcribe", str(clip), "--model", str(checkpoints["original"]), "--dtype", "float32"]
    args += ["--language", "English", "--stream", "--timestamps", "--aligner", str(aligners["hf"])]
    assert main([*args, "--format", "jsonl"]) == 0
    finals = [e for e in map(json.loads, capsys.readouterr().out.splitlines()) if e["type"] == "final"]
    assert len(finals) == 2
    for final in finals:
        assert final["words"] == _expected_words(load_aligner("hf"), two_utterances, final)
    assert any(final["words"] for final in finals)
    for suffix, parse in ((".srt", lambda text: list(srt.parse(text))), (".vtt", webvtt.from_string)):
        output = tmp_path / f"two{suffix}"
        assert main([*args, "--output", str(output)]) == 0
        cues = parse(output.read_text(encoding="utf-8"))
        assert cues, f"{suffix} has cues"


def test_aligner_flag_needs_timestamps(capsys):
    args = ["transcribe", str(LONG), "--aligner", "/nonexistent"]
    assert main(args) == 2
    assert "--aligner: only with --timestamps" in capsys.readouterr().err


@pytest.fixture(scope="module")
def talk(speech) -> np.ndarray:
    return np.concatenate([speech["cards-001"], GAP, speech["goforward"], GAP, speech["librivox-0890"], GAP])


@pytest.mark.asyncio
async def test_live_finals_carry_the_words_of_their_audio(load_model, load_aligner, talk):
    aligner = load_aligner("original")
    async with running_server(load_model("hf"), aligner=aligner) as server:
        health = await asyncio.wait_for(asyncio.to_thread(_get_json, server, "/healthz"), TIMEOUT)
        languages = await asyncio.wait_for(asyncio.to_thread(_get_json, server, "/v1/languages"), TIMEOUT)
        timed = await stream_audio(server.url, talk, pace=0.01, language="English", timestamps=True)
        plain = await stream_audio(server.url, talk, pace=0.01, language="English")
    assert health["aligner"] == aligner.info.name and languages["timestamps"] is True
    assert timed.events[0]["timestamps"] is True and plain.events[0]["timestamps"] is False
    finals = timed.of_type("final")
    assert [f["segment"] for f in finals] == [0, 1, 2]
    for final in finals:
        assert final["words"] == _expected_words(aligner, talk, final)
        assert ("words_error" in final) == (final["words"] is None)
    assert any(final["words"] for final in finals)
    assert all("words" not in final for final in plain.of_type("final"))
    assert [f["token_ids"] for f in plain.of_type("final")] == [f["token_ids"] for f in finals]


@pytest.mark.asyncio
async def test_unsupported_language_keeps_the_final(load_model, load_aligner, talk):
    async with running_server(load_model("hf"), aligner=load_aligner("hf")) as server:
        result = await stream_audio(server.url, talk, language="Arabic", timestamps=True)
    finals = result.of_type("final")
    assert len(finals) == 3 and result.close_code == 1000
    for final in finals:
        assert final["words"] is None and final["token_ids"]
        assert final["words_error"].startswith("the forced aligner does not support Arabic; it supports:")


@pytest.mark.asyncio
async def test_a_server_without_aligner_refuses_timestamps(load_model):
    async with running_server(load_model("hf")) as server:
        with pytest.raises(SessionRefused) as refusal:
            async with connect(server.url, timestamps=True, timeout=TIMEOUT):
                pass
    assert refusal.value.code == "bad_start" and refusal.value.close_code == 4400
    assert "no forced aligner" in str(refusal.value)


def test_the_align_stage_aligns_finished_finals_and_forgets_cancelled_ones(load_aligner, speech):
    from asrlive.engine import Hypothesis
    from asrlive.engine._batch import Finished
    from asrlive.web._align_stage import Aligned, AlignStage

    aligner = load_aligner("hf")
    stage = AlignStage(aligner)
    audio = {"final": speech["librivox-0890"], "partial": speech["cards-001"], "gone": speech["goforward"]}
    hypothesis = Hypothesis((1, 2), "English", "and so it was settled", 0)
    failure = RuntimeError("the transcription failed")
    finished = [Finished(key, hypothesis) for key in ("final", "partial", "gone")] + [Finished("broken", failure)]
    passed = stage.admit(finished, lambda key: audio[key] if key in ("final", "gone") else None)
    assert passed == [finished[1], finished[3]]  # a partial's and a failure's results go on as they were
    assert len(stage) == 2
    stage.cancel("gone")
    assert len(stage) == 1
    done = []
    while stage:
        done += stage.step()
    [item] = done
    expected = aligner.alignment(audio["final"], hypothesis.text, "English")
    assert item == Finished("final", Aligned(hypothesis, expected)) and expected.words
