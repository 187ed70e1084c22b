"""`asrlive transcribe --output/--format`: subtitles and transcripts in files, written as the work
goes, their cues the engine's segments (offline) or finals (--stream) cut to a readable length."""

from __future__ import annotations

import html
import io
import json

import numpy as np
import pytest
import soundfile
import srt
import webvtt

import asrlive.engine
from asrlive._cli_transcribe import Progress
from asrlive.cli import main
from asrlive.clients._transcript import split_cues, timestamp
from asrlive.engine import SAMPLE_RATE, DecodingOptions, load_audio, transcribe

from .checkpoints import FIXTURES
from .media import M4A, encode

LONG = FIXTURES / "speech" / "two-cities.wav"  # 44 s: three pieces of at most 20 s
CLIP = FIXTURES / "speech" / "librivox-0880.wav"
OFFLINE = ["--dtype", "float32", "--max-new-tokens", "30", "--max-segment-seconds", "20"]


def _caption(text: str) -> str:
    return " ".join(text.split())


def _run(checkpoints, *args: str) -> int:
    return main(["transcribe", *args, "--model", str(checkpoints["hf"])])


@pytest.fixture(scope="module")
def long_segments(load_model):
    """What the engine makes of LONG with the OFFLINE options: the pieces the files must hold."""
    options = DecodingOptions(max_new_tokens=30, max_segment_seconds=20)
    return transcribe(load_model("hf"), load_audio(LONG), options).segments


@pytest.mark.slow
def test_srt_cues_are_the_segments_cut_to_readable_length(checkpoints, long_segments, tmp_path, capsys):
    output = tmp_path / "two-cities.srt"
    assert _run(checkpoints, str(LONG), *OFFLINE, "--output", str(output)) == 0
    assert capsys.readouterr().out == ""  # the transcript went to the file
    subtitles = list(srt.parse(output.read_text(encoding="utf-8")))
    expected = [cue for s in long_segments for cue in split_cues(s.text, s.start, s.end)]
    assert len(long_segments) == 3 and len(expected) > 3  # 13-15 s pieces: more than one cue each
    assert [s.content for s in subtitles] == ["\n".join(cue.lines) for cue in expected]
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subtitles] == [
        (round(cue.start, 3), round(cue.end, 3)) for cue in expected
    ]
    for segment in long_segments:
        # Each piece's cues span it exactly and hold its text, token for token.
        inside = [s for s in subtitles if segment.start - 5e-4 <= s.start.total_seconds() < segment.end - 5e-4]
        assert inside[0].start.total_seconds() == round(segment.start, 3)
        assert inside[-1].end.total_seconds() == round(segment.end, 3)
        assert "".join(s.content for s in inside).replace("\n", "").replace(" ", "") == "".join(segment.text.split())
        for s in inside:
            assert (s.end - s.start).total_seconds() <= 7.0005
            assert len(s.content.split("\n")) <= 2


@pytest.mark.slow
def test_vtt_txt_and_json_files(checkpoints, long_segments, tmp_path):
    for suffix in (".vtt", ".txt", ".json"):
        assert _run(checkpoints, str(LONG), *OFFLINE, "--output", str(tmp_path / f"out{suffix}")) == 0
    expected = [cue for s in long_segments for cue in split_cues(s.text, s.start, s.end)]
    captions = webvtt.read(str(tmp_path / "out.vtt"))
    assert [html.unescape(c.raw_text) for c in captions] == ["\n".join(cue.lines) for cue in expected]
    assert [(c.start, c.end) for c in captions] == [(timestamp(c.start, "."), timestamp(c.end, ".")) for c in expected]
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [_caption(s.text) for s in long_segments if _caption(s.text)]  # one line per piece
    record = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert record["file"] == str(LONG) and record["duration"] == pytest.approx(44.374125)
    assert record["segments"] == [
        {"start": s.start, "end": s.end, "language": s.language, "text": s.text, "token_ids": list(s.token_ids)}
        for s in long_segments
    ]
    assert record["token_ids"] == [t for s in long_segments for t in s.token_ids]


@pytest.mark.slow
def test_srt_on_standard_output_for_one_file(checkpoints, long_segments, capsys):
    assert _run(checkpoints, str(LONG), *OFFLINE, "--format", "srt") == 0
    subtitles = list(srt.parse(capsys.readouterr().out))
    assert len(subtitles) == sum(len(split_cues(s.text, s.start, s.end)) for s in long_segments)


@pytest.mark.slow
def test_stream_subtitles_are_the_finals(speech, checkpoints, load_model, tmp_path):
    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([gap, speech["librivox-0870"], gap, speech["cards-005"], gap])
    path = tmp_path / "two.wav"
    soundfile.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    stream = ["--stream", "--dtype", "float32", "--max-new-tokens", "40", "--language", "English", "--no-partials"]
    assert _run(checkpoints, str(path), *stream, "--output", str(tmp_path / "two.jsonl")) == 0
    assert _run(checkpoints, str(path), *stream, "--output", str(tmp_path / "two.srt")) == 0
    assert _run(checkpoints, str(path), *stream, "--output", str(tmp_path / "two.json")) == 0
    events = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text(encoding="utf-8").splitlines()]
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 2
    for final in finals:  # the finals in the file are the engine's, for their span of the audio
        piece = audio[round(final["start"] * SAMPLE_RATE) : round(final["end"] * SAMPLE_RATE)]
        offline = transcribe(load_model("hf"), piece, DecodingOptions("English", max_new_tokens=40))
        assert final["token_ids"] == offline.token_ids
    expected = [cue for f in finals for cue in split_cues(f["text"], f["start"], f["end"])]
    assert len(expected) > 2  # the 7 s utterance's text needs more than one cue
    subtitles = list(srt.parse((tmp_path / "two.srt").read_text(encoding="utf-8")))
    assert [s.content for s in subtitles] == ["\n".join(cue.lines) for cue in expected]
    assert [s.start.total_seconds() for s in subtitles] == [round(cue.start, 3) for cue in expected]
    assert subtitles[0].start.total_seconds() == round(finals[0]["start"], 3)
    assert subtitles[-1].end.total_seconds() == round(finals[-1]["end"], 3)
    record = json.loads((tmp_path / "two.json").read_text(encoding="utf-8"))
    assert record["segments"] == [{k: f[k] for k in ("start", "end", "language", "text", "token_ids")} for f in finals]
    assert record["duration"] == round(audio.size / SAMPLE_RATE, 6)


@pytest.mark.slow
def test_a_folder_gets_one_file_per_input_and_m4a_is_read(speech, checkpoints, load_model, tmp_path):
    m4a = encode(tmp_path / "cards.m4a", speech["cards-005"], M4A)
    folder = tmp_path / "subtitles"
    folder.mkdir()
    args = [str(CLIP), str(m4a), "--output", str(folder), "--format", "vtt", "--dtype", "float32"]
    assert _run(checkpoints, *args, "--max-new-tokens", "12") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["cards.vtt", "librivox-0880.vtt"]
    expected = transcribe(load_model("hf"), load_audio(m4a), DecodingOptions(max_new_tokens=12))
    captions = webvtt.read(str(folder / "cards.vtt"))
    text = "".join(html.unescape(c.raw_text) for c in captions).replace("\n", "").replace(" ", "")
    assert text == "".join(expected.text.split())


@pytest.mark.slow
def test_ctrl_c_leaves_the_pieces_already_done(checkpoints, long_segments, tmp_path, monkeypatch, capsys):
    real = asrlive.engine.transcribe

    def interrupted_after_two(model, audio, options, on_segment, aligner=None):
        def counted(segment):
            on_segment(segment)
            if segment.end > 20:
                raise KeyboardInterrupt

        return real(model, audio, options, on_segment=counted, aligner=aligner)

    monkeypatch.setattr(asrlive.engine, "transcribe", interrupted_after_two)
    for suffix in (".srt", ".json"):
        output = tmp_path / f"out{suffix}"
        assert _run(checkpoints, str(LONG), *OFFLINE, "--output", str(output)) == 130
        err = capsys.readouterr().err
        assert f"{output} holds the transcript of the first {long_segments[1].end:.1f} s (of 44.4 s)" in err
    done = long_segments[:2]
    subtitles = list(srt.parse((tmp_path / "out.srt").read_text(encoding="utf-8")))
    assert [s.content for s in subtitles] == [
        "\n".join(cue.lines) for s in done for cue in split_cues(s.text, s.start, s.end)
    ]
    record = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert [s["token_ids"] for s in record["segments"]] == [list(s.token_ids) for s in done]
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.slow
def test_a_truncated_wav_is_transcribed_with_a_warning(speech, checkpoints, load_model, tmp_path, capsys):
    path = tmp_path / "cut.wav"
    soundfile.write(path, speech["librivox-0870"], SAMPLE_RATE, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:113_622])  # half of it
    assert _run(checkpoints, str(path), "--format", "json", "--dtype", "float32", "--max-new-tokens", "8") == 0
    out, err = capsys.readouterr()
    assert err == (
        f"asrlive transcribe: {path}: the file is truncated: read 3.55 s of audio, its header announces 7.10 s; "
        "transcribing what was read\n"
    )
    [record] = [json.loads(line) for line in out.splitlines()]
    audio = speech["librivox-0870"][:56_789]
    assert record["duration"] == round(audio.size / SAMPLE_RATE, 6)
    assert record["token_ids"] == transcribe(load_model("hf"), audio, DecodingOptions(max_new_tokens=8)).token_ids


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [str(CLIP), str(LONG), "--output", "x.srt"],
            "--output x.srt is one file for 2 inputs: give an existing folder",
        ),
        ([str(CLIP), "--output", "{tmp}"], "is a folder: say what to write there with --format"),
        ([str(CLIP), "--output", "{tmp}/x.srt", "--format", "vtt"], "x.srt is named for srt, not --format vtt"),
        ([str(CLIP), "--output", "{tmp}/x.doc"], "say the format with --format, or end the name in .srt, .vtt"),
        (
            [str(CLIP), str(LONG), "--format", "srt"],
            "--format srt makes one file per input: with several, give --output",
        ),
        ([str(CLIP), str(CLIP), "--output", "{tmp}", "--format", "txt"], "would both be written to"),
        ([str(CLIP), "--output", "{tmp}/absent/x.vtt"], "the folder {tmp}/absent does not exist"),
        ([str(CLIP), "--output", str(CLIP), "--format", "txt"], "is an input: it would be overwritten"),
        ([str(CLIP), "--output", "{tmp}/x.jsonl"], "--format jsonl needs --stream"),
    ],
)
def test_output_usage_errors_come_before_any_work(tmp_path, capsys, args, message):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    assert main(["transcribe", *args, "--model", str(tmp_path / "no-model")]) == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.is_file()]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_counts_seconds_with_one_decimal():
    progress = Progress("talk.m4a", 399.4, file=_Terminal())
    with progress:
        end = 0.0
        for _ in range(2217):  # 0.1 s at a time: 221.70000000000002 in floating point
            end += 0.1
            progress.reach(end)
        assert "| 221.7/399.4 s [" in str(progress)
        assert str(progress).startswith("talk.m4a:  56%|")
        progress.reach(399.4)
        assert "| 399.4/399.4 s [" in str(progress)
