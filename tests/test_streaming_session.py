"""The sans-I/O session on real speech: segmentation, jobs, coalescing, events (no model involved)."""

from __future__ import annotations

import numpy as np
import pytest

from asrlive.streaming import (
    SAMPLE_RATE,
    Final,
    Partial,
    Session,
    SessionOptions,
    SpeechStarted,
    SpeechStopped,
    VadOptions,
    stable_prefix,
)

GAP = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)


@pytest.fixture(scope="module")
def three_utterances(speech):
    """Three real utterances separated by 1.2 s of silence, and where each clip lies in the stream."""
    clips = [speech["cards-001"], speech["librivox-0880"], speech["goforward"]]
    parts, spans, position = [GAP], [], GAP.size
    for clip in clips:
        parts += [clip, GAP]
        spans.append((position, position + clip.size))
        position += clip.size + GAP.size
    return np.concatenate(parts), spans


def _feed(session: Session, audio: np.ndarray, chunk: int) -> list:
    events = []
    for i in range(0, audio.size, chunk):
        events += session.feed(audio[i : i + chunk])
    return events + session.finish()


def _drain(session: Session) -> list:
    jobs = []
    while (job := session.next_job()) is not None:
        jobs.append(job)
    return jobs


def test_one_utterance_per_spoken_clip(three_utterances):
    audio, spans = three_utterances
    session = Session(SessionOptions(partials=False))
    events = _feed(session, audio, 1600)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SpeechStarted", "SpeechStopped"] * 3
    for (clip_start, clip_end), started, stopped in zip(spans, events[::2], events[1::2], strict=True):
        assert clip_start - SAMPLE_RATE // 2 <= started.start < clip_end
        assert clip_start < stopped.end <= clip_end + SAMPLE_RATE // 2
        assert stopped.reason == "silence"
    finals = _drain(session)
    assert [(j.segment, j.start, j.end, j.final) for j in finals] == [
        (e.segment, s.start, e.end, True) for s, e in zip(events[::2], events[1::2], strict=True)
    ]
    for job in finals:
        assert np.array_equal(job.audio, audio[job.start : job.end])


def test_silence_never_reaches_the_model(speech):
    rng = np.random.default_rng(0)
    hum = (0.002 * rng.standard_normal(5 * SAMPLE_RATE)).astype(np.float32)
    session = Session()
    assert _feed(session, hum, 4000) == []
    assert session.next_job() is None


def test_chunk_size_does_not_change_anything(three_utterances):
    audio, _ = three_utterances
    results = []
    for chunk in (160, 1000, 4801, audio.size):
        session = Session(SessionOptions(partial_interval_ms=500))
        events = _feed(session, audio, chunk)
        results.append((events, [(j.segment, j.start, j.end) for j in _drain(session)]))
    assert all(r == results[0] for r in results[1:])


def test_long_speech_is_cut_at_the_maximum_length(speech):
    audio = speech["two-cities"][: 25 * SAMPLE_RATE]
    options = SessionOptions(vad=VadOptions(max_utterance_s=4, end_silence_ms=3000), partials=False)
    session = Session(options)
    events = _feed(session, audio, 3200)
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert sum(e.reason == "max_length" for e in stops) >= 4
    for started, stopped in zip(starts, stops, strict=True):
        assert stopped.end - started.start <= 4 * SAMPLE_RATE
    for stopped, following in zip(stops, starts[1:], strict=False):
        if stopped.reason == "max_length":
            assert following.start == stopped.end  # the next utterance goes on from the cut


def test_partials_follow_the_interval_and_coalesce(speech):
    audio = np.concatenate([GAP, speech["librivox-0870"]])
    session = Session(SessionOptions(partial_interval_ms=1000))
    session.feed(audio[: 3 * SAMPLE_RATE])
    first = session.next_job()
    assert first is not None and not first.final and first.end == session.position
    assert session.next_job() is None  # no new second of audio yet
    session.feed(audio[3 * SAMPLE_RATE : 7 * SAMPLE_RATE])  # 4 s arrive while the engine is busy
    latest = session.next_job()
    assert latest.end == session.position and latest.start == first.start
    assert session.next_job() is None  # one partial on the newest audio, not four


def test_finals_are_queued_in_order_and_partials_after_their_final_dropped(three_utterances):
    audio, _ = three_utterances
    session = Session(SessionOptions(partial_interval_ms=500))
    fed, partial = 0, None
    while partial is None:
        session.feed(audio[fed : fed + 1600])
        fed, partial = fed + 1600, session.next_job()
    assert partial.segment == 0 and not partial.final
    session.feed(audio[fed:])
    session.finish()
    # Segment 0 closed meanwhile, but its final is not out yet: the partial is still news.
    (late,) = session.complete(partial, [1, 2], "ten of", None)
    assert isinstance(late, Partial) and (late.segment, late.text) == (0, "ten of")
    finals = [job for job in _drain(session) if job.final]
    assert [job.segment for job in finals] == [0, 1, 2]
    events = session.complete(finals[0], (5, 6), "ten of clubs", "English")
    assert events == [Final(0, "ten of clubs", "English", finals[0].start, finals[0].end, (5, 6))]
    assert session.complete(partial, [1, 2], "ten of", None) == []  # after its final: superseded


def test_partial_events_split_stable_and_unstable(speech):
    session = Session(SessionOptions(partial_interval_ms=500))
    session.feed(np.concatenate([GAP, speech["librivox-0870"][: 3 * SAMPLE_RATE]]))
    texts = ["the family of", "the family of Dashwood", "the family of Dashwoods had long"]
    events = []
    for text in texts:
        job = session.next_job()
        events += session.complete(job, [len(text)], text, None)
        session.feed(speech["librivox-0870"][3 * SAMPLE_RATE : 3 * SAMPLE_RATE + 9600])
    assert [(e.stable, e.unstable) for e in events] == [
        ("", "the family of"),
        ("the family of", " Dashwood"),
        ("the family of ", "Dashwoods had long"),
    ]
    assert all(isinstance(e, Partial) and e.stable + e.unstable == e.text for e in events)


@pytest.mark.parametrize(
    "previous, current, stable",
    [
        ("", "hello", ""),
        ("hello", "hello world", "hello"),
        ("hello wor", "hello world", "hello "),
        ("hellos", "hello there", ""),
        ("the cat", "the cap", "the "),
        ("你好世界", "你好世", "你好世"),
    ],
)
def test_stable_prefix(previous, current, stable):
    assert stable_prefix(previous, current) == stable


def test_event_json():
    partial = Partial(3, "a b", "a ", "b", 16000, 24000, (7, 8))
    assert partial.to_json() == {
        "type": "partial",
        "segment": 3,
        "text": "a b",
        "stable": "a ",
        "unstable": "b",
        "start": 1.0,
        "audio_end": 1.5,
        "token_ids": [7, 8],
    }
    final = Final(3, "a b", None, 16000, 24001, (7,))
    assert final.to_json() == {
        "type": "final",
        "segment": 3,
        "text": "a b",
        "language": None,
        "start": 1.0,
        "end": 24001 / 16000,
        "token_ids": [7],
    }
    assert SpeechStopped(1, 8000, "finish").to_json() == {
        "type": "speech_stopped",
        "segment": 1,
        "end": 0.5,
        "reason": "finish",
    }


def test_feed_after_finish_is_an_error():
    session = Session()
    session.finish()
    with pytest.raises(RuntimeError, match=r"feed\(\) after finish\(\)"):
        session.feed(np.zeros(480, dtype=np.float32))
