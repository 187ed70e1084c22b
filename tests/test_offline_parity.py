"""Offline transcription is token-identical to transformers' processor + greedy `generate`: exactly
with the loop cut off, cut by the rule of engine/_loops.py with it on (the default)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import soundfile

from asrlive.engine import SAMPLE_RATE, DecodingOptions, load_audio, transcribe
from asrlive.engine._loops import without_loop

MAX_NEW_TOKENS = 40
MODES = {
    "auto": (None, None),
    "auto+context": (None, "Dashwood, Norland Park, Sussex"),
    "forced": ("English", None),
    "forced+context": ("English", "Dashwood, Norland Park, Sussex"),
}


@pytest.fixture(scope="module")
def clips(speech, tmp_path_factory) -> dict[str, np.ndarray]:
    """Under 1 s; 1-8 s; over 8 s (three 8 s attention windows); a stereo 44.1 kHz file."""
    stereo_path = tmp_path_factory.mktemp("audio") / "stereo-44k.flac"
    source = speech["librivox-0890"]
    left = np.interp(np.arange(0, source.size, SAMPLE_RATE / 44_100), np.arange(source.size), source)
    right = np.roll(left, 300) * 0.5  # the channels differ, so the downmix matters
    soundfile.write(stereo_path, np.stack([left, right], axis=1), 44_100)
    return {
        "short-0.7s": speech["cards-001"][: int(0.7 * SAMPLE_RATE)],
        "medium-3s": speech["librivox-0880"],
        "long-20s": speech["two-cities"][: 20 * SAMPLE_RATE],
        "stereo-44k": load_audio(stereo_path),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", ["short-0.7s", "medium-3s", "long-20s", "stereo-44k"])
def test_token_ids_equal_generate(clips, load_model, reference, clip, mode, dtype):
    language, context = MODES[mode]
    audio = clips[clip]
    expected = reference(dtype).token_ids(audio, language, context, MAX_NEW_TOKENS)
    options = DecodingOptions(language, context or "", MAX_NEW_TOKENS, cut_loops=False)
    for layout in ("hf", "original"):
        result = transcribe(load_model(layout, dtype), audio, options)
        assert result.token_ids == expected, f"{layout} layout"
        assert len(result.segments) == 1
        assert result.duration == audio.size / SAMPLE_RATE
        if language is not None:
            assert result.language == language
    cut = transcribe(load_model("hf", dtype), audio, replace(options, cut_loops=True))
    assert cut.token_ids == without_loop(expected)


def test_outputs_depend_on_audio_and_prompt(clips, load_model):
    """Guards the parity test against a degenerate network whose answer ignores its input."""
    model = load_model("hf")
    answers = {
        (clip, mode): tuple(
            transcribe(model, clips[clip], DecodingOptions(MODES[mode][0], MODES[mode][1] or "", 40)).token_ids
        )
        for clip in clips
        for mode in MODES
    }
    assert len(set(answers.values())) == len(answers)
    assert any(len(ids) < 40 for ids in answers.values()), "no answer ended with eos"
    assert any(len(ids) == 40 for ids in answers.values()), "no answer ran to the token cap"


def test_long_audio_is_cut_at_quiet_points_and_each_piece_matches_generate(speech, load_model, reference):
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    first, second = speech["librivox-0870"], speech["librivox-0920"]  # 7.1 s and 6.05 s
    audio = np.concatenate([first, pause, second])
    options = DecodingOptions(language="English", max_new_tokens=MAX_NEW_TOKENS, max_segment_seconds=9)

    result = transcribe(load_model("original"), audio, options)

    assert len(result.segments) == 2
    cut = round(result.segments[0].end * SAMPLE_RATE)
    assert first.size <= cut <= first.size + pause.size, "the cut falls inside the pause"
    assert result.segments[1].start == result.segments[0].end
    assert result.segments[1].end == audio.size / SAMPLE_RATE
    for segment in result.segments:
        piece = audio[round(segment.start * SAMPLE_RATE) : round(segment.end * SAMPLE_RATE)]
        expected = reference().token_ids(piece, "English", None, MAX_NEW_TOKENS)
        assert list(segment.token_ids) == without_loop(expected)  # the cut is on by default
    assert result.token_ids == [t for s in result.segments for t in s.token_ids]
