"""Streaming is exact: every partial equals greedy `generate` on the utterance audio up to its
`audio_end` (cut by the rule of engine/_loops.py unless the cut is off), every final equals offline
transcription of the utterance (float32, where the incremental computation is bit-faithful; see
docs/streaming.md for bfloat16)."""

from __future__ import annotations

import numpy as np
import pytest

from asrlive._local import stream_audio
from asrlive.engine import SAMPLE_RATE, DecodingOptions, StreamTranscriber, transcribe
from asrlive.engine._loops import without_loop
from asrlive.engine._offline import token_budget
from asrlive.streaming import Final, Partial, Session, SessionOptions, VadOptions

GAP = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)


def _samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def _stream(model, audio, options: DecodingOptions, session_options: SessionOptions):
    transcriber = StreamTranscriber(model, options)
    events = [e.to_json() for e in stream_audio(Session(session_options), transcriber, audio)]
    assert transcriber.open_utterances == 0, "every utterance's state is released at its final"
    return events, transcriber


def _check_against_reference(events, audio, options: DecodingOptions, model, reference):
    partials = [e for e in events if e["type"] == "partial"]
    finals = [e for e in events if e["type"] == "final"]
    for event in partials + finals:
        end = event["audio_end"] if event["type"] == "partial" else event["end"]
        piece = audio[_samples(event["start"]) : _samples(end)]
        budget = token_budget(piece.size / SAMPLE_RATE, options)
        expected = reference().token_ids(piece, options.language, options.context or None, budget)
        if options.cut_loops:
            expected = without_loop(expected)
        assert event["token_ids"] == expected, f"{event['type']} of segment {event['segment']} at {end} s"
        if event["type"] == "final":
            offline = transcribe(model, piece, options)
            assert (event["text"], event["language"]) == (offline.text, offline.language)
    return partials, finals


@pytest.mark.parametrize(
    "language, context", [(None, None), ("English", None), (None, "cards, clubs, hearts"), ("English", "Dashwood")]
)
def test_utterances_of_real_speech(speech, load_model, reference, language, context):
    audio = np.concatenate([GAP, speech["cards-001"], GAP, speech["librivox-0880"], GAP, speech["goforward"], GAP])
    options = DecodingOptions(language=language, context=context or "", max_new_tokens=24)
    model = load_model("original")
    events, _ = _stream(model, audio, options, SessionOptions(partial_interval_ms=500))
    partials, finals = _check_against_reference(events, audio, options, model, reference)
    assert [f["segment"] for f in finals] == [0, 1, 2]
    assert len(partials) >= 6
    for partial in partials:
        assert partial["stable"] + partial["unstable"] == partial["text"]


def test_loud_speech_after_quiet_speech_moves_the_clamp_floor(speech, load_model, reference):
    """One 17 s utterance: 9 s at -26 dB (a whole 8 s window completes while quiet), then loud.
    The louder frames raise the running maximum, so the completed window must be re-encoded."""
    quiet = 0.05 * np.concatenate([speech["librivox-0870"], speech["librivox-0890"]])[: 9 * SAMPLE_RATE]
    loud = speech["two-cities"][_samples(1.0) : _samples(9.0)]
    audio = np.concatenate([GAP, quiet, loud, GAP]).astype(np.float32)
    options = DecodingOptions(language="English", max_new_tokens=24)
    vad = VadOptions(aggressiveness=0, end_silence_ms=1000)
    model = load_model("hf")
    events, transcriber = _stream(model, audio, options, SessionOptions(vad=vad, partial_interval_ms=1000))
    partials, finals = _check_against_reference(events, audio, options, model, reference)
    assert len(finals) == 1 and finals[0]["end"] - finals[0]["start"] > 16
    assert transcriber.windows_encoded > 2, "window 0 is encoded again once the loud part moved the floor"


def test_completed_windows_are_encoded_once(speech, load_model, reference):
    """A 19 s utterance whose loudest frames come first: each completed 8 s window is encoded
    exactly once however many updates follow."""
    model = load_model("hf")
    body = speech["two-cities"][_samples(1.0) : _samples(20.0)]
    loudest = int(model.features(body).max(dim=0).values.argmax()) * 160  # the frame holding the maximum
    opening = 2.0 * body[loudest - 4800 : loudest + 4800]  # louder than anything after it
    audio = np.concatenate([GAP, opening, body, GAP])
    audio = audio.astype(np.float32)
    options = DecodingOptions(max_new_tokens=16)
    vad = VadOptions(aggressiveness=0, end_silence_ms=1500)
    events, transcriber = _stream(model, audio, options, SessionOptions(vad=vad, partial_interval_ms=1000))
    partials, finals = _check_against_reference(events, audio, options, model, reference)
    assert len(finals) == 1 and len(partials) >= 15
    complete_windows = int(finals[0]["end"] - finals[0]["start"]) // 8
    assert complete_windows == 2
    assert transcriber.windows_encoded == complete_windows


@pytest.mark.parametrize("cut_loops", [True, False])
def test_default_token_budget_and_a_final_after_finish(speech, load_model, reference, cut_loops):
    """No trailing silence: the stream ends mid-speech and finish() produces the last final."""
    audio = np.concatenate([GAP, speech["librivox-0930"]])
    options = DecodingOptions(cut_loops=cut_loops)
    model = load_model("original")
    events, _ = _stream(model, audio, options, SessionOptions(partial_interval_ms=700))
    _, finals = _check_against_reference(events, audio, options, model, reference)
    stopped = [e for e in events if e["type"] == "speech_stopped"]
    assert [s["reason"] for s in stopped] == ["finish"]
    assert len(finals) == 1


def test_partial_and_final_objects(speech, load_model):
    audio = np.concatenate([GAP, speech["cards-002"], GAP])
    transcriber = StreamTranscriber(load_model("hf"), DecodingOptions(max_new_tokens=8))
    events = list(stream_audio(Session(SessionOptions(partial_interval_ms=500)), transcriber, audio))
    partial = next(e for e in events if isinstance(e, Partial))
    final = next(e for e in events if isinstance(e, Final))
    assert partial.segment == final.segment == 0
    assert partial.start == final.start and partial.audio_end < final.end


def test_realtime_pacing_coalesces_partials_but_keeps_finals(speech, load_model):
    """At real-time pace the engine runs while audio keeps arriving: partials may be fewer and
    later, finals are exactly those of the as-fast-as-possible run."""
    audio = np.concatenate([GAP[:8000], speech["cards-003"], GAP])
    options, session_options = DecodingOptions(max_new_tokens=12), SessionOptions(partial_interval_ms=300)
    runs = {}
    for realtime in (False, True):
        transcriber = StreamTranscriber(load_model("hf"), options)
        runs[realtime] = list(stream_audio(Session(session_options), transcriber, audio, realtime=realtime))
    finals = {mode: [e for e in events if isinstance(e, Final)] for mode, events in runs.items()}
    assert finals[True] == finals[False] and len(finals[True]) == 1
    partials = {mode: [e for e in events if isinstance(e, Partial)] for mode, events in runs.items()}
    assert 1 <= len(partials[True]) <= len(partials[False])
