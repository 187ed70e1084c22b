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


# -- speculative finals -----------------------------------------------------------------------------

SPECULATIVE = SessionOptions(partials=False, speculative_finals=True)
PAUSE = np.zeros(int(0.3 * SAMPLE_RATE), dtype=np.float32)  # long enough to speculate, too short to close


def _answer(session: Session, job) -> list:
    """The engine's answer to ``job``: a result that depends only on its audio (its bounds)."""
    return session.complete(job, (job.start, job.end), f"{job.start}-{job.end}", None)


def _run(session: Session, audio: np.ndarray, *, hold: int = 0, stop: int | None = None, chunk: int = 1600):
    """Feed ``audio`` (up to ``stop``, then finish) like a transport, with an engine that answers each
    job ``hold`` feeds after taking it, one job at a time. All events in order, and the jobs."""
    events, jobs = [], []
    in_flight = None  # [job, feeds before its answer]

    def work(wait: bool) -> None:
        nonlocal in_flight
        while True:
            if in_flight is not None:
                if wait and in_flight[1] > 0:
                    in_flight[1] -= 1
                    return
                events.extend(_answer(session, in_flight[0]))
                in_flight = None
            job = session.next_job()
            if job is None:
                return
            jobs.append(job)
            in_flight = [job, hold]

    end = audio.size if stop is None else stop
    for begin in range(0, end, chunk):
        events.extend(session.feed(audio[begin : min(begin + chunk, end)]))
        work(wait=True)
    events.extend(session.finish())
    work(wait=False)
    return events, jobs


def _finals(events) -> list:
    return [e for e in events if isinstance(e, Final)]


def test_a_speculative_job_is_the_final_without_a_second_computation(three_utterances):
    audio, _ = three_utterances
    plain_events, plain_jobs = _run(Session(SessionOptions(partials=False)), audio)
    events, jobs = _run(Session(SPECULATIVE), audio)
    # The same finals on the same bounds, each computed once, by a job offered before the utterance closed.
    assert _finals(events) == _finals(plain_events) and len(_finals(events)) == 3
    assert [(j.segment, j.start, j.end) for j in jobs] == [(j.segment, j.start, j.end) for j in plain_jobs]
    assert all(j.speculative and not j.final for j in jobs)
    # speech_stopped, then the final at once, out of the feed that closed the utterance.
    assert events == plain_events
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SpeechStarted", "SpeechStopped", "Final"] * 3


def test_a_speculative_job_in_flight_when_its_utterance_closes_gives_the_final(speech):
    audio = np.concatenate([GAP, speech["cards-001"], GAP])
    session = Session(SPECULATIVE)
    fed, job = 0, None
    while job is None:
        session.feed(audio[fed : fed + 480])
        fed, job = fed + 480, session.next_job()
    assert job.speculative and job.end == session.position  # as soon as pad_ms of unvoiced audio was heard
    (stopped,) = session.feed(audio[fed:])  # the utterance closes at the job's end while it runs
    assert isinstance(stopped, SpeechStopped) and stopped.end == job.end
    assert session.next_job() is None and session.pending_finals == 0  # no second computation
    assert not session.stale(job)
    (final,) = _answer(session, job)
    assert (final.segment, final.start, final.end, final.text) == (0, job.start, job.end, f"{job.start}-{job.end}")
    assert session.finalized == 0


def test_resumed_speech_turns_the_speculative_result_into_a_partial(speech):
    audio = np.concatenate([GAP, speech["cards-001"], PAUSE, speech["cards-002"], GAP])
    events, jobs = _run(Session(SessionOptions(partial_interval_ms=1000, speculative_finals=True)), audio)
    first, second = [j for j in jobs if j.speculative]
    # The pause: a speculation on the audio so far, delivered as an ordinary partial once speech resumed.
    (resumed,) = [e for e in events if isinstance(e, Partial) and e.audio_end == first.end]
    assert (resumed.segment, resumed.start, resumed.text) == (0, first.start, f"{first.start}-{first.end}")
    assert events.index(resumed) < next(i for i, e in enumerate(events) if isinstance(e, SpeechStopped))
    # One utterance: its final is the second speculation, on the same bounds as without speculating.
    plain_events, _ = _run(Session(SessionOptions(partial_interval_ms=1000)), audio)
    (final,) = _finals(events)
    assert _finals(plain_events) == [final] and (final.start, final.end) == (second.start, second.end)
    assert not any(j.final for j in jobs)


def test_resumed_speech_with_partials_off_drops_the_speculative_result(speech):
    audio = np.concatenate([GAP, speech["cards-001"], PAUSE, speech["cards-002"], GAP])
    for hold in (0, 2):  # answered before speech resumes, or after
        events, jobs = _run(Session(SPECULATIVE), audio, hold=hold)
        assert [type(e).__name__ for e in events] == ["SpeechStarted", "SpeechStopped", "Final"]
        assert len(jobs) == 2 and all(j.speculative for j in jobs)


def test_a_partial_is_stale_once_its_utterance_closed_with_a_final_of_its_own(speech):
    audio = np.concatenate([GAP, speech["librivox-0880"], GAP])
    session = Session(SessionOptions(partial_interval_ms=500, speculative_finals=True))
    fed, partial = 0, None
    while partial is None:
        session.feed(audio[fed : fed + 1600])
        fed, partial = fed + 1600, session.next_job()
    assert not partial.speculative and not session.stale(partial)
    session.feed(audio[fed:])  # closes the utterance while the partial runs: the final is queued
    assert session.stale(partial) and session.pending_finals == 1
    (final,) = _drain(session)
    assert final.final and not session.stale(final)


@pytest.mark.parametrize("hold", [0, 3, 8])
def test_finish_during_a_speculation_never_loses_or_repeats_a_final(speech, hold):
    """The stream ends at every point of it, with the engine answering at once or some feeds later
    (8 feeds: after the utterance closed): every utterance gets exactly its final, on the bounds it
    has without speculation."""
    audio = np.concatenate([GAP, speech["cards-003"], GAP, speech["goforward"], GAP])
    for stop in range(2 * SAMPLE_RATE, audio.size, 800):
        expected, _ = _run(Session(SessionOptions(partials=False)), audio, stop=stop, chunk=800)
        events, jobs = _run(Session(SPECULATIVE), audio, hold=hold, stop=stop, chunk=800)
        assert _finals(events) == _finals(expected), stop
        assert [e for e in events if not isinstance(e, Final)] == [e for e in expected if not isinstance(e, Final)]
        segments = [f.segment for f in _finals(events)]
        assert segments == sorted(set(segments)) == list(range(len(segments)))
        for final in _finals(events):  # after its speech_stopped; computed once
            stopped = next(e for e in events if isinstance(e, SpeechStopped) and e.segment == final.segment)
            assert events.index(stopped) < events.index(final)
            assert sum((j.start, j.end) == (final.start, final.end) for j in jobs) == 1
