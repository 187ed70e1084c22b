"""Protocol v1's rules (docs/protocol.md sections 5 and 6) on the sans-I/O state machine, in milliseconds.

Real speech goes in; the engine is a stand-in that answers every job with a fixed text, so what is
checked is the order and kind of the events, the states and the endings, not transcription.
"""

from __future__ import annotations

import numpy as np
import pytest

from asrlive.streaming import SAMPLE_RATE, CloseCode, ProtocolError, SessionOptions, Start
from asrlive.streaming._v1 import State, StreamOptions, StreamProtocol

GAP = np.zeros(SAMPLE_RATE, dtype=np.float32)
FIELDS = {"sample_rate": 16000, "encoding": "pcm_s16le"}


def protocol(**options) -> StreamProtocol:
    session = SessionOptions(partial_interval_ms=200)
    return StreamProtocol(StreamOptions(session=session, **options), "s1")


def opened(**options) -> StreamProtocol:
    proto = protocol(**options)
    assert proto.begin(Start()) == []
    [ready] = proto.open(FIELDS)
    assert ready["type"] == "ready" and ready["session"] == "s1" and proto.state is State.OPEN
    return proto


def answer(proto: StreamProtocol, partials: bool = True) -> list[dict]:
    """Every job the session has now, answered with the same text (as an engine would, in order)."""
    events = []
    while (job := proto.next_job(partials=partials)) is not None:
        events += proto.complete(job, (9707,), "hello", "English")
    return events


def feed(proto: StreamProtocol, audio: np.ndarray, chunk: int = 1600, answering: bool = True) -> list[dict]:
    events = []
    for i in range(0, audio.size, chunk):
        events += proto.receive_audio(audio[i : i + chunk])
        if answering:
            events += answer(proto)
    return events


def types(events: list[dict]) -> list[str]:
    return [event["type"] for event in events]


@pytest.fixture(scope="module")
def utterance(speech) -> np.ndarray:
    return np.concatenate([GAP, speech["goforward"], GAP])


def test_a_session_goes_ready_events_finish_done(utterance):
    proto = opened()
    events = feed(proto, utterance)
    assert types(events)[0] == "speech_started" and "partial" in types(events) and "final" in types(events)
    assert types(events).index("speech_stopped") < types(events).index("final")
    assert proto.receive_text('{"type": "finish"}') == [] and proto.state is State.FINISHING
    assert not proto.receiving and proto.idle_timeout_s is None
    proto.drain()
    answer(proto)
    [done] = proto.done(audio_seconds=utterance.size / SAMPLE_RATE)
    assert done == {"type": "done", "reason": "finish", "audio_seconds": utterance.size / SAMPLE_RATE, "segments": 1}
    assert proto.closing == (CloseCode.NORMAL, "finish") and proto.state is State.DONE


def test_before_start_only_an_error_goes_out_and_no_done():
    proto = protocol()
    assert proto.receive_audio(GAP) == [] and proto.receive_text('{"type": "finish"}') == []  # nothing is open
    [error] = proto.error(ProtocolError("not_started", "start first"))
    assert error["code"] == "not_started" and proto.state is State.DONE
    assert proto.done(0.0) == [] and proto.closing == (CloseCode.BAD_REQUEST, "not_started")
    assert proto.lag(5.0) == [] and proto.next_job() is None


def test_a_bad_start_is_refused_before_the_transport_opens():
    def check(start: Start) -> str | None:
        raise ProtocolError("bad_start", "no such language")

    proto = protocol(check_start=check)
    [error] = proto.begin(Start(language="Klingon"))
    assert error["code"] == "bad_start" and proto.state is State.DONE and not proto.started
    assert proto.open(FIELDS) == []  # no ready, ever
    assert proto.closing == (CloseCode.BAD_REQUEST, "bad_start")


def test_ready_carries_the_checked_language_and_the_limits():
    proto = protocol(check_start=lambda start: "English", max_session_s=60.0, model="tiny")
    proto.begin(Start(language="en", partials=False, partial_interval_ms=500))
    [ready] = proto.open({"sample_rate": 48000, "encoding": "opus"})
    assert ready["language"] == "English" and ready["model"] == "tiny" and ready["sample_rate"] == 48000
    assert ready["partials"] is False and ready["partial_interval_ms"] == 500
    assert ready["limits"]["max_session_s"] == 60.0


def test_idle_timeout_before_start_has_no_done_and_after_start_drains():
    proto = protocol()
    assert proto.idle_timeout_s == 30.0
    [error] = proto.timed_out()
    assert error["code"] == "idle_timeout" and proto.done(0.0) == [] and proto.closing[0] == CloseCode.IDLE_TIMEOUT
    proto = opened()
    proto.timed_out()
    assert proto.state is State.ERRORED
    assert proto.done(0.0)[0]["reason"] == "idle_timeout"


def test_after_an_error_only_the_cut_utterance_stop_its_finals_and_done(utterance):
    proto = opened()
    cut = utterance.size // 2  # mid-utterance
    feed(proto, utterance[:cut])
    [error] = proto.receive_text('{"type": "dance"}')
    assert error["code"] == "unknown_type" and proto.state is State.ERRORED and not proto.receiving
    assert proto.receive_audio(utterance[cut:]) == []  # nothing more is read
    assert proto.lag(3.0) == []  # lag is no news after an error
    drained = proto.drain()
    assert types(drained) == ["speech_stopped"] and drained[0]["reason"] == "finish"
    after = answer(proto)
    assert set(types(after)) <= {"final"} and "final" in types(after)
    assert types(proto.done(1.0)) == ["done"] and proto.closing == (CloseCode.BAD_REQUEST, "unknown_type")


def test_a_partial_completed_after_an_error_is_not_sent(utterance):
    proto = opened()
    feed(proto, utterance[: utterance.size // 2], answering=False)
    job = proto.next_job()
    assert job is not None and not job.final
    proto.error(ProtocolError("bad_audio", "odd number of bytes"))
    assert proto.complete(job, (1,), "late", "English") == []


def test_done_is_the_last_event(utterance):
    proto = opened()
    feed(proto, utterance[: utterance.size // 2], answering=False)
    job = proto.next_job()
    proto.shutdown()
    assert proto.closing == (CloseCode.GOING_AWAY, "shutdown")
    proto.drain()
    assert types(proto.done(1.0)) == ["done"]
    assert job is not None and proto.complete(job, (1,), "late", "English") == []
    assert proto.lag(1.0) == [] and proto.fail("late failure") == [] and proto.done(1.0) == []
    assert proto.receive_text('{"type": "finish"}') == [] and proto.timed_out() == []


def test_internal_error_loses_the_pending_finals_and_says_so(utterance):
    proto = opened()
    feed(proto, utterance, answering=False)  # the final's job is due, not done
    [error] = proto.fail("transcription failed: RuntimeError")
    assert error == {"type": "error", "code": "internal_error", "message": "transcription failed: RuntimeError"}
    assert proto.failed and proto.next_job() is None and proto.drain() == []
    assert proto.fail("again") == []  # once
    [done] = proto.done(1.0)
    assert done["reason"] == "internal_error" and proto.closing == (CloseCode.INTERNAL_ERROR, "internal_error")


def test_an_inference_failure_while_draining_after_an_error_is_a_second_error(utterance):
    proto = opened()
    feed(proto, utterance, answering=False)
    proto.error(ProtocolError("frame_too_large", "too large"))
    proto.drain()
    assert types(proto.fail("transcription failed: OSError")) == ["error"]
    assert proto.done(1.0)[0]["reason"] == "internal_error"


def test_audio_past_the_length_limit_is_cut_with_session_too_long(utterance):
    proto = opened(max_session_s=1.5)
    events = feed(proto, utterance, chunk=4000)
    assert types(events)[-1] == "error" and events[-1]["code"] == "session_too_long"
    assert proto.position == round(1.5 * SAMPLE_RATE)  # the frame that crossed was fed up to the limit
    assert proto.closing == (CloseCode.SESSION_TOO_LONG, "session_too_long")
    assert proto.done(1.5)[0]["reason"] == "session_too_long"


def test_a_second_start_is_already_started():
    proto = opened()
    [error] = proto.receive_text('{"type": "start"}')
    assert error["code"] == "already_started" and proto.state is State.ERRORED
    assert proto.begin(Start()) == []  # an ended session takes no start either


def test_shutdown_before_start_closes_quietly_and_after_start_drains():
    proto = protocol()
    assert proto.shutdown() == [] and proto.state is State.DONE and proto.done(0.0) == []
    assert proto.closing == (CloseCode.GOING_AWAY, "shutdown")
    proto = opened()
    proto.shutdown()
    assert proto.state is State.FINISHING and proto.done(0.0)[0]["reason"] == "shutdown"


def test_lag_goes_out_while_live_and_while_finishing():
    proto = opened()
    assert proto.lag(2.5) == [{"type": "lag", "seconds": 2.5, "pending_finals": 0}]
    proto.receive_text('{"type": "finish"}')
    assert types(proto.lag(2.5)) == ["lag"]


def test_the_scheduler_sees_a_job_source_only_once_started(utterance):
    proto = protocol()
    assert not proto.started and proto.next_job() is None and proto.pending_finals == 0 and proto.finalized == -1
    proto.begin(Start())
    proto.open(FIELDS)
    feed(proto, utterance, answering=False)
    proto.receive_text('{"type": "finish"}')
    proto.drain()
    assert proto.pending_finals == 1 and proto.finished
    answer(proto)
    assert proto.pending_finals == 0 and proto.finalized == 0


@pytest.mark.parametrize(("code", "close"), [("unauthorized", 4401), ("server_full", 1013), ("server_busy", 1013)])
def test_a_refusal_is_the_only_event_and_no_done(code, close):
    proto = protocol()
    [error] = proto.error(ProtocolError(code, "refused"))
    assert error == {"type": "error", "code": code, "message": "refused"} and proto.closing == (close, code)
    assert proto.begin(Start()) == [] and proto.done(0.0) == [] and not proto.started


def test_no_partial_of_a_segment_follows_its_final(utterance):
    proto = opened()
    events = feed(proto, np.concatenate([utterance, utterance]))
    for final in [e for e in events if e["type"] == "final"]:
        after = events[events.index(final) + 1 :]
        assert not [e for e in after if e["type"] == "partial" and e["segment"] == final["segment"]]
    assert [e["segment"] for e in events if e["type"] == "final"] == [0, 1]  # in order, none dropped
