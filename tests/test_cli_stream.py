"""`asrlive transcribe --stream`: one JSON event per line, finals equal offline transcription."""

from __future__ import annotations

import json

import numpy as np
import soundfile

from asrlive.cli import main
from asrlive.engine import SAMPLE_RATE, DecodingOptions, transcribe


def test_jsonl_events(speech, checkpoints, load_model, tmp_path, capsys):
    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([gap, speech["cards-004"], gap, speech["librivox-0930"], gap])
    path = tmp_path / "two.wav"
    soundfile.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    code = main(
        ["transcribe", str(path), "--stream", "--format", "jsonl", "--model", str(checkpoints["hf"]),
         "--dtype", "float32", "--max-new-tokens", "10", "--partial-interval-ms", "600", "--language", "English"]
    )  # fmt: skip
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds.count("speech_started") == kinds.count("speech_stopped") == kinds.count("final") == 2
    assert "partial" in kinds
    for partial in (e for e in events if e["type"] == "partial"):
        assert set(partial) == {"type", "segment", "text", "stable", "unstable", "start", "audio_end", "token_ids"}
    for final in (e for e in events if e["type"] == "final"):
        assert set(final) == {"type", "segment", "text", "language", "start", "end", "token_ids"}
        piece = audio[round(final["start"] * SAMPLE_RATE) : round(final["end"] * SAMPLE_RATE)]
        offline = transcribe(load_model("hf"), piece, DecodingOptions("English", max_new_tokens=10))
        assert final["token_ids"] == offline.token_ids and final["language"] == "English"


def test_jsonl_needs_stream_and_stream_options_are_checked(checkpoints, capsys):
    assert main(["transcribe", "x.wav", "--format", "jsonl"]) == 2
    assert "--format jsonl needs --stream" in capsys.readouterr().err
    assert main(["transcribe", "x.wav", "--stream", "--partial-interval-ms", "10"]) == 2
    assert (
        capsys.readouterr().err == "asrlive transcribe: --partial-interval-ms must be at least 100\n"
    )  # the flag's name
    assert main(["transcribe", "x.wav", "--realtime"]) == 2  # a streaming flag without --stream is refused
    assert capsys.readouterr().err == "asrlive transcribe: --realtime: only with --stream\n"
