"""The sans-I/O core of OpenAI's Realtime transcription API (streaming/_realtime.py) on real speech.

No model, no server: a fake engine completes each job with a text made from its bounds. Every event
the session emits is parsed by the openai SDK's own pydantic models (GA ``openai.types.realtime``,
beta ``openai.types.beta.realtime``), with no field the SDK does not know: the proof of wire
compatibility.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pydantic
import pytest
import soxr
from openai._models import construct_type_unchecked
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.beta.realtime.transcription_session_update import Session as BetaSessionFields
from openai.types.realtime import (
    RealtimeServerEvent,
    RealtimeTranscriptionSessionCreateRequest,
    RealtimeTranscriptionSessionCreateResponse,
)

from asrlive.streaming import SAMPLE_RATE, AudioDecoder, Final, Job, Session, SessionOptions, Start, VadOptions
from asrlive.streaming._realtime import RealtimeOptions, RealtimeSession
from asrlive.streaming._realtime_audio import ALAW, ULAW, decode_base64
from asrlive.streaming._realtime_config import TurnDetection

GA_EVENTS = pydantic.TypeAdapter(RealtimeServerEvent)
BETA_EVENTS = pydantic.TypeAdapter(BetaServerEvent)
SESSION_EXTRAS = {"id", "object", "expires_at"}  # the session object of a created/updated event
TRANSCRIPT = "conversation.item.input_audio_transcription"
COMMIT_GA = ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
COMMIT_BETA = ["input_audio_buffer.committed", "conversation.item.created"]
GAP = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)


# -- helpers ---------------------------------------------------------------------------------------


def _no_extras(value: Any, path: str, allowed: dict[str, set[str]]) -> None:
    """No field the SDK's models do not declare, at any depth (they accept extras silently)."""
    if isinstance(value, pydantic.BaseModel):
        extras = set(value.model_extra or ())
        assert extras <= allowed.get(path, set()), f"{path}: fields unknown to the SDK: {extras}"
        for name in type(value).model_fields:
            _no_extras(getattr(value, name), f"{path}.{name}", allowed)
    elif isinstance(value, list):
        for item in value:
            _no_extras(item, f"{path}[]", allowed)


class Checked:
    """Every server event of one session, validated as it comes."""

    def __init__(self, beta: bool = False) -> None:
        self.beta = beta
        self.events: list[dict[str, Any]] = []
        self.ids: set[str] = set()

    def __call__(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        events = list(events)
        for event in events:
            assert json.loads(json.dumps(event)) == event  # plain JSON: no numpy numbers, no NaN
            assert event["event_id"].startswith("event_") and event["event_id"] not in self.ids
            self.ids.add(event["event_id"])
            self._validate(event)
        self.events += events
        return events

    def _validate(self, event: dict[str, Any]) -> None:
        if self.beta:
            if event["type"] in ("transcription_session.created", "transcription_session.updated"):
                # Not in the beta union (created) or with a REST-only client_secret required (updated).
                assert set(event) == {"type", "event_id", "session"}
                fields = dict(event["session"])
                # The beta types list OpenAI's three model names only; the SDK parses server events
                # leniently (construct_type_unchecked), so asrlive's name arrives as a str.
                if fields["input_audio_transcription"] is not None:
                    assert isinstance(fields["input_audio_transcription"]["model"], str)
                    fields["input_audio_transcription"] = {**fields["input_audio_transcription"], "model": "whisper-1"}
                session = BetaSessionFields.model_validate(fields, strict=True)
                _no_extras(session, "session", {"session": SESSION_EXTRAS})
                assert event["session"]["object"] == "realtime.transcription_session"
                return
            model = BETA_EVENTS.validate_python(event, strict=True)
        else:
            model = GA_EVENTS.validate_python(event, strict=True)
        assert model.type == event["type"]
        # What the SDK's connection does with a received event: the same class.
        union = BetaServerEvent if self.beta else RealtimeServerEvent
        assert type(construct_type_unchecked(value=event, type_=cast(Any, union))) is type(model)
        allowed = {}
        if event["type"] in ("session.created", "session.updated"):
            assert isinstance(model.session, RealtimeTranscriptionSessionCreateRequest)
            allowed = {".session": SESSION_EXTRAS}
            response = RealtimeTranscriptionSessionCreateResponse.model_validate(event["session"], strict=True)
            assert response.object == "realtime.transcription_session" and response.id.startswith("sess_")
            # (the response type has the flat, legacy turn detection: the union's fields are extras there)
            flat = {".audio.input.turn_detection": {"idle_timeout_ms", "eagerness"}}
            _no_extras(response, "", flat)
        _no_extras(model, "", allowed)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]


def pcm24(audio: np.ndarray) -> bytes:
    """16 kHz float32 -> 24 kHz 16-bit little-endian PCM, as a Realtime client sends it."""
    resampled = soxr.resample(audio.astype(np.float32), SAMPLE_RATE, 24_000)
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def append(audio: bytes, event_id: str | None = None) -> str:
    event = {"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode("ascii")}
    if event_id is not None:
        event["event_id"] = event_id
    return json.dumps(event)


def message(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def label(job: Job) -> str:
    """The fake engine's transcript: the job's bounds."""
    return f"<{job.segment}:{job.start}-{job.end}>"


def run_engine(session: RealtimeSession, check: Checked, jobs: list[Job] | None = None) -> None:
    while (job := session.next_job()) is not None:
        if jobs is not None:
            jobs.append(job)
        check(session.complete(job, [1, 2], label(job), "English"))


def stream(session: RealtimeSession, check: Checked, data: bytes, chunk: int, jobs: list[Job] | None = None) -> None:
    """Append ``data`` in chunks, the engine keeping up."""
    for i in range(0, len(data), chunk):
        check(session.receive(append(data[i : i + chunk])))
        run_engine(session, check, jobs)


def new_session(options: RealtimeOptions | None = None, beta: bool = False) -> tuple[RealtimeSession, Checked]:
    session = RealtimeSession(options or RealtimeOptions(), beta=beta)
    check = Checked(beta)
    assert len(check(session.opened())) == 1
    return session, check


def update(session: RealtimeSession, check: Checked, ga: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    if session.beta:
        return check(session.receive(message("transcription_session.update", session=ga, **fields)))
    return check(session.receive(message("session.update", session={"type": "transcription", **ga}, **fields)))


def manual(session: RealtimeSession, check: Checked) -> None:
    events = update(session, check, {"audio": {"input": {"turn_detection": None}}})
    assert [e["type"] for e in events] == ["session.updated"]


def items(check: Checked) -> dict[str, dict[str, Any]]:
    """item id -> its deltas joined and its completed transcript."""
    result: dict[str, dict[str, Any]] = {}
    for event in check.events:
        if event["type"] == f"{TRANSCRIPT}.delta":
            entry = result.setdefault(event["item_id"], {"deltas": ""})
            entry["deltas"] += event["delta"]
        elif event["type"] == f"{TRANSCRIPT}.completed":
            result.setdefault(event["item_id"], {"deltas": ""})["transcript"] = event["transcript"]
    return result


def assert_deltas_add_up(check: Checked) -> None:
    for item_id, entry in items(check).items():
        assert entry["deltas"] == entry["transcript"], item_id


@pytest.fixture(scope="module")
def conversation(speech) -> np.ndarray:
    """Three real utterances, each followed by a pause long enough to end it."""
    clips = [speech["goforward"], speech["cards-001"], speech["librivox-0880"]]
    return np.concatenate([GAP[:8000], *(part for clip in clips for part in (clip, GAP))])


# -- session.created and session.update -----------------------------------------------------------


def test_session_created_has_the_servers_defaults():
    session, check = new_session()
    [created] = check.events
    assert created["type"] == "session.created"
    vad = VadOptions()
    assert created["session"] == {
        "type": "transcription",
        "id": session.id,
        "object": "realtime.transcription_session",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "qwen3-asr", "language": None, "prompt": ""},
                "noise_reduction": None,
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": vad.pad_ms,
                    "silence_duration_ms": vad.end_silence_ms,
                    "idle_timeout_ms": None,
                },
            }
        },
        "include": None,
    }
    assert session.id.startswith("sess_") and session.language is None and session.context == ""
    assert session.next_job() is None and session.finalized == -1 and session.segments == 0


def test_session_created_beta_and_expiry():
    session = RealtimeSession(RealtimeOptions(model="asr-1"), beta=True, expires_at=1_700_000_000)
    check = Checked(beta=True)
    [created] = check(session.opened())
    assert created["type"] == "transcription_session.created"
    assert created["session"] == {
        "id": session.id,
        "object": "realtime.transcription_session",
        "expires_at": 1_700_000_000,
        "input_audio_format": "pcm16",
        "input_audio_transcription": {"model": "asr-1", "language": None, "prompt": ""},
        "turn_detection": {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 600,
        },
        "input_audio_noise_reduction": None,
        "include": None,
    }


def test_the_servers_vad_options_are_the_defaults():
    vad = VadOptions(aggressiveness=3, end_silence_ms=900, pad_ms=200)
    session, check = new_session(RealtimeOptions(SessionOptions(vad=vad)))
    turn = check.events[0]["session"]["audio"]["input"]["turn_detection"]
    assert (turn["threshold"], turn["prefix_padding_ms"], turn["silence_duration_ms"]) == (0.75, 200, 900)
    # A client that sends these values back changes nothing: the VAD stays the server's.
    assert TurnDetection("server_vad", 0.75, 200, 900).vad(vad) == vad
    events = update(session, check, {"audio": {"input": {"turn_detection": turn}}})
    assert [e["type"] for e in events] == ["session.updated"]


def test_session_update_applies_and_reports_everything():
    languages = {"en": "English", "de": "German"}
    options = RealtimeOptions(language=lambda code: languages[code], check_prompt=lambda text: None)
    session, check = new_session(options)
    audio_input = {
        "format": {"type": "audio/pcmu"},
        "transcription": {"model": "gpt-4o-transcribe", "language": "de", "prompt": "Fahrkarten", "keywords": ["ICE"]},
        "noise_reduction": {"type": "near_field"},
        "turn_detection": {
            "type": "server_vad",
            "threshold": 0.9,
            "prefix_padding_ms": 100,
            "silence_duration_ms": 450,
        },
    }
    [updated] = update(
        session, check, {"audio": {"input": audio_input}, "include": ["item.input_audio_transcription.logprobs"]}
    )
    assert updated["type"] == "session.updated" and "event_id" in updated
    reported = updated["session"]["audio"]["input"]
    assert reported["format"] == {"type": "audio/pcmu"}
    assert reported["transcription"] == audio_input["transcription"]
    assert reported["noise_reduction"] == {"type": "near_field"}
    assert reported["turn_detection"] == {**audio_input["turn_detection"], "idle_timeout_ms": None}
    assert updated["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    assert (session.language, session.context) == ("German", "Fahrkarten\nICE")
    # Fields left out keep their values; nested ones too.
    [updated] = update(
        session, check, {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.3}}}}
    )
    turn = updated["session"]["audio"]["input"]["turn_detection"]
    assert (turn["threshold"], turn["prefix_padding_ms"], turn["silence_duration_ms"]) == (0.3, 100, 450)
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    # transcription: null goes back to the default.
    [updated] = update(session, check, {"audio": {"input": {"transcription": None}}})
    assert updated["session"]["audio"]["input"]["transcription"] == {
        "model": "qwen3-asr",
        "language": None,
        "prompt": "",
    }
    assert (session.language, session.context) == (None, "")


@pytest.mark.parametrize(
    ("spec", "beta_name"),
    [
        ({"type": "audio/pcm", "rate": 24000}, "pcm16"),
        ({"type": "audio/pcm"}, "pcm16"),
        ({"type": "audio/pcmu"}, "g711_ulaw"),
        ({"type": "audio/pcma"}, "g711_alaw"),
    ],
)
def test_each_format(spec, beta_name):
    session, check = new_session()
    [updated] = update(session, check, {"audio": {"input": {"format": spec}}})
    rate = 24000 if spec["type"] == "audio/pcm" else None
    assert updated["session"]["audio"]["input"]["format"] == ({**spec, "rate": rate} if rate else spec)
    beta, beta_check = new_session(beta=True)
    [updated] = update(beta, beta_check, {"input_audio_format": beta_name})
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_format"] == beta_name


def test_turn_detection_maps_onto_the_vad():
    base = VadOptions()
    assert TurnDetection("server_vad", 0.5, 300, 600).vad(base) == base
    mapped = TurnDetection("server_vad", 0.2, 150, 800).vad(base)
    assert (mapped.aggressiveness, mapped.pad_ms, mapped.end_silence_ms) == (0, 150, 800)
    modes = {t: TurnDetection("server_vad", t, 300, 600).vad(base).aggressiveness for t in (0.24, 0.25, 0.74, 0.75, 1)}
    assert modes == {0.24: 0, 0.25: 1, 0.74: 2, 0.75: 3, 1: 3}
    eager = {
        e: TurnDetection("semantic_vad", 0.5, 300, 600, e).vad(base).end_silence_ms for e in ("low", "auto", "high")
    }
    assert eager == {"low": 1200, "auto": 600, "high": 300}
    session, check = new_session()
    [updated] = update(
        session, check, {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "low"}}}}
    )
    assert updated["session"]["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "low"}


@pytest.mark.parametrize(
    ("ga", "code", "param"),
    [
        ({"type": "realtime"}, "invalid_value", "session.type"),
        ({}, "missing_required_parameter", "session.type"),
        ({"type": "transcription", "voice": "alloy"}, "unknown_parameter", "session.voice"),
        ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/wav"}}}}, "invalid_value", None),
        (
            {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}},
            "invalid_value",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {
                "type": "transcription",
                "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": True}}},
            },
            "invalid_type",
            "session.audio.input.turn_detection.silence_duration_ms",
        ),
        (
            {
                "type": "transcription",
                "audio": {"input": {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}},
            },
            "unknown_parameter",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {"type": "transcription", "audio": {"input": {"transcription": {"language": "xx"}}}},
            "invalid_value",
            "session.audio.input.transcription.language",
        ),
        (
            {"type": "transcription", "audio": {"input": {"transcription": {"prompt": "a\x00b"}}}},
            "invalid_value",
            "session.audio.input.transcription.prompt",
        ),
        ({"type": "transcription", "include": ["nope"]}, "invalid_value", "session.include[0]"),
    ],
)
def test_bad_session_updates_are_errors_and_change_nothing(ga, code, param):
    def language(code: str) -> str:
        if code != "en":
            raise ValueError(f"unknown language {code!r}")
        return "English"

    session, check = new_session(RealtimeOptions(language=language))
    [error] = check(session.receive(message("session.update", session=ga, event_id="evt_1")))
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["code"] == code
    assert error["error"]["event_id"] == "evt_1"
    if param is not None:
        assert error["error"]["param"] == param
    # The session goes on, unchanged.
    [updated] = update(session, check, {})
    assert updated["session"] == check.events[0]["session"]


def test_beta_session_update():
    session, check = new_session(beta=True)
    fields = {
        "input_audio_format": "g711_alaw",
        "input_audio_transcription": {"model": "whisper-1", "language": "en", "prompt": "names"},
        "turn_detection": {"silence_duration_ms": 700},
        "input_audio_noise_reduction": {"type": "far_field"},
        "modalities": ["text"],
    }
    [updated] = update(session, check, fields)
    reported = updated["session"]
    assert reported["input_audio_format"] == "g711_alaw"
    assert reported["input_audio_transcription"] == fields["input_audio_transcription"]
    assert reported["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 700,
    }
    assert reported["input_audio_noise_reduction"] == {"type": "far_field"}
    assert session.language == "en" and session.context == "names"
    # The GA name of the update is not this dialect's.
    [error] = check(session.receive(message("session.update", session={"type": "transcription"}, event_id="e2")))
    assert error["error"]["param"] == "type" and error["error"]["event_id"] == "e2"


# -- client errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code", "param", "echo"),
    [
        ("{not json", "invalid_json", None, None),
        ('{"event_id": "e1"}', "invalid_json", None, "e1"),
        ('["input_audio_buffer.commit"]', "invalid_json", None, None),
        ('{"type": "response.create", "event_id": "e2"}', "invalid_value", "type", "e2"),
        ('{"type": "no.such", "event_id": "e3"}', "invalid_value", "type", "e3"),
        ('{"type": "input_audio_buffer.append", "event_id": "e4", "audio": "@@@"}', "invalid_value", "audio", "e4"),
        ('{"type": "input_audio_buffer.append", "event_id": "e5", "audio": "AAA"}', "invalid_value", "audio", "e5"),
        ('{"type": "input_audio_buffer.append", "event_id": "e6"}', "missing_required_parameter", "audio", "e6"),
        ('{"type": "input_audio_buffer.append", "event_id": "e7", "audio": 5}', "invalid_type", "audio", "e7"),
        ('{"type": "input_audio_buffer.clear", "event_id": "e8", "x": 1}', "unknown_parameter", "x", "e8"),
        ('{"type": "session.update", "event_id": "e9"}', "missing_required_parameter", "session", "e9"),
        ('{"type": "input_audio_buffer.commit", "event_id": 5}', "invalid_value", "event_id", None),
        ('{"type": "input_audio_buffer.commit", "event_id": "\\ud800"}', "invalid_value", "event_id", None),
    ],
)
def test_bad_client_events_get_an_error_and_the_session_goes_on(text, code, param, echo):
    session, check = new_session()
    [error] = check(session.receive(text))
    assert error["type"] == "error"
    assert (error["error"]["code"], error["error"]["param"], error["error"]["event_id"]) == (code, param, echo)
    assert error["error"]["message"]
    [cleared] = check(session.receive(message("input_audio_buffer.clear")))
    assert cleared["type"] == "input_audio_buffer.cleared"


def test_base64_is_strict():
    assert decode_base64(base64.b64encode(b"\x01\x02\x03").decode()) == b"\x01\x02\x03"
    for bad in ("AQID\n", "AQI", "AQ=D", "é"):
        with pytest.raises(ValueError):
            decode_base64(bad)


def test_a_15_mib_append(speech):
    """The largest append the API allows (15 MiB of base64: about 4 minutes at 24 kHz), in one piece."""
    session, check = new_session()
    manual(session, check)
    clip = pcm24(speech["two-cities"])
    data = (clip * (15 * 2**20 * 3 // 4 // len(clip) + 1))[: 15 * 2**20 * 3 // 4]
    assert len(base64.b64encode(data)) == 15 * 2**20
    assert check(session.receive(append(data))) == []
    check(session.receive(message("input_audio_buffer.commit")))
    job = session.next_job()
    assert job is not None and abs(job.audio.size - len(data) // 2 * 2 // 3) <= 1


# -- manual turns ----------------------------------------------------------------------------------


def test_manual_commits_make_items(speech):
    session, check = new_session()
    manual(session, check)
    expected_jobs = []
    position = 0
    for name in ("goforward", "cards-001"):
        data = pcm24(speech[name])
        for i in range(0, len(data), 4801):  # samples split across appends
            assert check(session.receive(append(data[i : i + 4801]))) == []
        assert session.pending_finals == len(expected_jobs)  # nothing before the commit
        reference = AudioDecoder(Start(sample_rate=24000))  # a commit flushes the resampler
        audio = np.concatenate([reference.decode(data), reference.flush()])
        expected_jobs.append((position, position + audio.size, audio))
        position += audio.size
        events = check(session.receive(message("input_audio_buffer.commit", event_id="c")))
        assert [e["type"] for e in events] == COMMIT_GA
    ids = [e["item_id"] for e in check.of("input_audio_buffer.committed")]
    assert [e["previous_item_id"] for e in check.of("input_audio_buffer.committed")] == [None, ids[0]]
    assert [e["item"]["id"] for e in check.of("conversation.item.added")] == ids
    assert [e["previous_item_id"] for e in check.of("conversation.item.done")] == [None, ids[0]]
    assert len(set(ids)) == 2 and all(i.startswith("item_") for i in ids)
    assert check.of("conversation.item.done")[0]["item"] == {
        "id": ids[0],
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_audio", "transcript": None}],
    }
    jobs = [session.next_job(), session.next_job()]
    assert session.next_job() is None and session.pending_finals == 0
    for segment, (job, (start, end, audio)) in enumerate(zip(jobs, expected_jobs, strict=True)):
        assert job is not None and (job.segment, job.start, job.end, job.final) == (segment, start, end, True)
        np.testing.assert_array_equal(job.audio, audio)
    # Results in any order: each item gets its delta(s) and completed.
    assert jobs[1] is not None and jobs[0] is not None
    second = check(session.complete(jobs[1], [7], "second", "English"))
    assert session.finalized == -1  # the first is not out yet
    first = check(session.complete(jobs[0], [7], "first", "English"))
    assert session.finalized == 1
    assert [(e["type"], e["item_id"]) for e in first + second] == [
        (f"{TRANSCRIPT}.delta", ids[0]),
        (f"{TRANSCRIPT}.completed", ids[0]),
        (f"{TRANSCRIPT}.delta", ids[1]),
        (f"{TRANSCRIPT}.completed", ids[1]),
    ]
    completed = first[1]
    assert completed == {
        "type": f"{TRANSCRIPT}.completed",
        "event_id": completed["event_id"],
        "item_id": ids[0],
        "content_index": 0,
        "transcript": "first",
        "usage": {"type": "duration", "seconds": jobs[0].audio.size / SAMPLE_RATE},
    }
    assert first[0]["delta"] == "first" and first[0]["content_index"] == 0
    assert check(session.complete(jobs[0], [7], "again", "English")) == []  # once only
    assert_deltas_add_up(check)


def test_empty_commits_and_clear(speech):
    session, check = new_session()
    manual(session, check)
    [error] = check(session.receive(message("input_audio_buffer.commit", event_id="c1")))
    assert error["error"]["code"] == "input_audio_buffer_commit_empty" and error["error"]["event_id"] == "c1"
    check(session.receive(append(b"\x00\x00" * 2000)))  # 83 ms at 24 kHz: under 100 ms
    [error] = check(session.receive(message("input_audio_buffer.commit", event_id="c2")))
    assert error["error"]["code"] == "input_audio_buffer_commit_empty" and "100ms" in error["error"]["message"]
    check(session.receive(append(pcm24(speech["cards-001"]))))
    [cleared] = check(session.receive(message("input_audio_buffer.clear", event_id="x")))
    assert cleared == {"type": "input_audio_buffer.cleared", "event_id": cleared["event_id"]}
    [error] = check(session.receive(message("input_audio_buffer.commit")))
    assert error["error"]["code"] == "input_audio_buffer_commit_empty" and error["error"]["event_id"] is None
    # Audio after the clear is the next item, at its place in the stream.
    check(session.receive(append(pcm24(speech["goforward"]))))
    check(session.receive(message("input_audio_buffer.commit")))
    job = session.next_job()
    assert job is not None and job.segment == 0 and job.end == session.position
    assert job.start > 0 and job.end - job.start == job.audio.size


def test_the_uncommitted_buffer_is_bounded(speech):
    session, check = new_session(RealtimeOptions(max_buffer_s=2))
    manual(session, check)
    data = pcm24(np.concatenate([speech["goforward"], speech["cards-001"]]))  # about 5 s
    errors = [e for i in range(0, len(data), 9600) for e in check(session.receive(append(data[i : i + 9600], "a")))]
    assert [e["error"]["code"] for e in errors] == ["input_audio_buffer_overflow"]  # once
    assert errors[0]["error"]["event_id"] == "a"
    check(session.receive(message("input_audio_buffer.commit")))
    job = session.next_job()
    assert job is not None and job.audio.size == 2 * SAMPLE_RATE and job.end == session.position
    # The newest audio is kept.
    decoder = AudioDecoder(Start(sample_rate=24000))
    whole = np.concatenate([decoder.decode(data), decoder.flush()])
    np.testing.assert_allclose(job.audio, whole[-job.audio.size :], atol=1e-6)
    # After the commit, a new overflow is reported again.
    errors = [e for i in range(0, len(data), 9600) for e in check(session.receive(append(data[i : i + 9600])))]
    assert len(errors) == 1


@pytest.mark.parametrize("kind", ["audio/pcmu", "audio/pcma"])
def test_g711_appends(speech, kind):
    """8 kHz G.711 in, the same audio as a /v1/stream client sending its 16-bit expansion at 8 kHz."""
    table = ULAW if kind == "audio/pcmu" else ALAW
    clip = soxr.resample(speech["goforward"], SAMPLE_RATE, 8000)
    codes = np.abs(table.astype(np.int32)[None, :] - (clip * 32767).astype(np.int32)[:, None]).argmin(1)
    data = codes.astype(np.uint8).tobytes()
    session, check = new_session()
    update(session, check, {"audio": {"input": {"format": {"type": kind}, "turn_detection": None}}})
    for i in range(0, len(data), 1000):
        check(session.receive(append(data[i : i + 1000])))
    check(session.receive(message("input_audio_buffer.commit")))
    job = session.next_job()
    reference = AudioDecoder(Start(sample_rate=8000))
    expected = np.concatenate([reference.decode(table[codes].tobytes()), reference.flush()])
    assert job is not None
    np.testing.assert_allclose(job.audio, expected, atol=1e-6)
    assert abs(job.audio.size - 2 * len(data)) <= 1
    # It is speech: close to the clip it was encoded from.
    back = soxr.resample(job.audio, SAMPLE_RATE, 8000)[: clip.size]
    assert np.corrcoef(back, clip[: back.size])[0, 1] > 0.99


def test_a_format_change_mid_buffer(speech):
    """The audio before the change goes through the old decoder, flushed; the rest through the new."""
    session, check = new_session()
    manual(session, check)
    pcm = pcm24(speech["goforward"])
    check(session.receive(append(pcm)))
    ulaw = bytes(range(256)) * 16  # 4096 codes: 0.512 s at 8 kHz
    [updated] = update(session, check, {"audio": {"input": {"format": {"type": "audio/pcmu"}}}})
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    check(session.receive(append(ulaw)))
    check(session.receive(message("input_audio_buffer.commit")))
    job = session.next_job()
    first = AudioDecoder(Start(sample_rate=24000))
    second = AudioDecoder(Start(sample_rate=8000))
    expected = [first.decode(pcm), first.flush(), second.decode(ULAW[np.frombuffer(ulaw, np.uint8)].tobytes())]
    expected.append(second.flush())
    assert job is not None
    np.testing.assert_array_equal(job.audio, np.concatenate(expected))


def test_g711_tables_match_the_standard():
    # ITU-T G.711 decoder outputs: µ-law in 14-bit steps (x4 here), A-law in 13-bit steps (x8 here).
    # µ-law: 0x80 -> +8031 (the largest), 0x00 -> -8031, 0xFF and 0x7F -> 0, 0xFE -> +2, 0xF0 -> +30
    # (the top of segment 0), 0xEF -> +33 (the first output of segment 1), 0x7E -> -2.
    mu = [8031, -8031, 0, 0, 2, 30, 33, -2]
    assert [int(ULAW[c]) for c in (0x80, 0x00, 0xFF, 0x7F, 0xFE, 0xF0, 0xEF, 0x7E)] == [4 * v for v in mu]
    # A-law (even bits inverted): 0xD5 -> +1, 0x55 -> -1, 0xD4 -> +3, 0xAA -> +4032 (the largest), 0x2A -> -4032.
    assert [int(ALAW[c]) for c in (0xD5, 0x55, 0xD4, 0xAA, 0x2A)] == [8 * v for v in (1, -1, 3, 4032, -4032)]
    for table in (ULAW, ALAW):
        assert table.dtype == np.dtype("<i2")
        values = np.sort(table.astype(np.int32))
        assert np.all(np.diff(np.unique(values)) > 0) and values[0] == -values[-1]
        # Round trip: encoding each decoded value (nearest code) decodes to the same value.
        codes = np.abs(table.astype(np.int32)[None, :] - table.astype(np.int32)[:, None]).argmin(1)
        np.testing.assert_array_equal(table[codes], table)
    assert len(np.unique(ULAW)) == 255 and len(np.unique(ALAW)) == 256  # µ-law has two zeros


# -- server VAD ------------------------------------------------------------------------------------


def reference_finals(data: bytes, chunk: int, options: SessionOptions | None = None) -> list[tuple[Job, str]]:
    """What /v1/stream makes of the same bytes (AudioDecoder at 24 kHz into a plain Session, the same
    fake engine): each final's text, and the job it came from (a final, or a speculative final on
    the same bounds)."""
    session, decoder = Session(options or SessionOptions()), AudioDecoder(Start(sample_rate=24000))
    finals: list[tuple[Job, str]] = []
    jobs: dict[str, Job] = {}
    for i in range(0, len(data), chunk):
        events = session.feed(decoder.decode(data[i : i + chunk]))
        while (job := session.next_job(partials=False)) is not None:
            jobs[label(job)] = job
            events += session.complete(job, [1, 2], label(job), "English")
        finals += [(jobs[event.text], event.text) for event in events if isinstance(event, Final)]
    return finals


def test_server_vad_transcripts_equal_the_streams_finals(conversation):
    data = pcm24(conversation)
    session, check = new_session()
    jobs: list[Job] = []
    stream(session, check, data, 4800, jobs)
    expected = reference_finals(data, 4800)
    assert len(expected) == 3
    assert [(j.segment, j.start, j.end, j.final) for j in jobs] == [
        (j.segment, j.start, j.end, True) for j, _ in expected
    ]
    for job, (reference, _) in zip(jobs, expected, strict=True):
        np.testing.assert_array_equal(job.audio, reference.audio)
    transcripts = [e["transcript"] for e in check.of(f"{TRANSCRIPT}.completed")]
    assert transcripts == [text for _, text in expected]
    # The events of each item, in order.
    per_item = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", *COMMIT_GA]
    per_item += [f"{TRANSCRIPT}.delta", f"{TRANSCRIPT}.completed"]
    assert check.types()[1:] == per_item * 3
    started = check.of("input_audio_buffer.speech_started")
    stopped = check.of("input_audio_buffer.speech_stopped")
    committed = check.of("input_audio_buffer.committed")
    ids = [e["item_id"] for e in started]
    assert [e["item_id"] for e in stopped] == ids == [e["item_id"] for e in committed]
    assert [e["previous_item_id"] for e in committed] == [None, *ids[:-1]]
    assert [e["audio_start_ms"] for e in started] == [j.start * 1000 // SAMPLE_RATE for j, _ in expected]
    assert [e["audio_end_ms"] for e in stopped] == [j.end * 1000 // SAMPLE_RATE for j, _ in expected]
    assert session.finalized == 2 and session.segments == 3
    assert_deltas_add_up(check)


def test_server_vad_with_the_servers_options_and_speculative_finals(conversation):
    """The route's options (here: speculative finals, a longer silence) reach the Session as they are."""
    options = SessionOptions(vad=VadOptions(end_silence_ms=750), speculative_finals=True)
    data = pcm24(conversation)
    session, check = new_session(RealtimeOptions(options))
    jobs: list[Job] = []
    stream(session, check, data, 2400, jobs)
    assert any(job.speculative for job in jobs)
    expected = reference_finals(data, 2400, options)
    assert any(job.speculative for job, _ in expected)
    assert [e["transcript"] for e in check.of(f"{TRANSCRIPT}.completed")] == [text for _, text in expected]
    assert len(expected) == 3 and session.finalized == 2
    assert_deltas_add_up(check)


def test_empty_transcripts_have_no_delta(conversation):
    session, check = new_session()
    data = pcm24(conversation)
    for i in range(0, len(data), 4800):
        check(session.receive(append(data[i : i + 4800])))
        while (job := session.next_job()) is not None:
            check(session.complete(job, [], "", None))
    assert not check.of(f"{TRANSCRIPT}.delta")
    assert [e["transcript"] for e in check.of(f"{TRANSCRIPT}.completed")] == ["", "", ""]


def test_a_commit_in_server_vad_mode_ends_the_utterance(speech):
    clip = speech["librivox-0880"]
    data = pcm24(np.concatenate([GAP[:8000], clip]))
    half = len(data) // 2 // 2 * 2
    session, check = new_session()
    jobs: list[Job] = []
    stream(session, check, data[:half], 4800, jobs)
    assert check.types()[1:] == ["input_audio_buffer.speech_started"]
    first = check.of("input_audio_buffer.speech_started")[0]["item_id"]
    events = check(session.receive(message("input_audio_buffer.commit")))
    assert [e["type"] for e in events] == COMMIT_GA  # no speech_stopped
    assert events[0]["item_id"] == first
    run_engine(session, check, jobs)
    assert len(jobs) == 1 and jobs[0].end == session.position
    # The rest of the speech is a new item, numbered on.
    stream(session, check, data[half:] + pcm24(GAP), 4800, jobs)
    assert [j.segment for j in jobs] == [0, 1] and jobs[1].start >= jobs[0].end
    second = check.of("input_audio_buffer.committed")[1]
    assert second["previous_item_id"] == first
    assert len(check.of(f"{TRANSCRIPT}.completed")) == 2 and session.finalized == 1
    assert_deltas_add_up(check)
    # No utterance open: nothing to commit.
    [error] = check(session.receive(message("input_audio_buffer.commit", event_id="c")))
    assert error["error"]["code"] == "input_audio_buffer_commit_empty" and error["error"]["event_id"] == "c"


def test_clear_in_server_vad_mode_drops_the_open_utterance(speech, conversation):
    options = SessionOptions(speculative_finals=True)
    session, check = new_session(RealtimeOptions(options))
    jobs: list[Job] = []
    first = pcm24(np.concatenate([GAP[:8000], speech["goforward"], GAP]))
    stream(session, check, first, 4800, jobs)
    cut = pcm24(speech["cards-001"][:12000])
    stream(session, check, cut, 4800, jobs)
    assert len(check.of("input_audio_buffer.speech_started")) == 2
    dropped = check.of("input_audio_buffer.speech_started")[1]["item_id"]
    [cleared] = check(session.receive(message("input_audio_buffer.clear")))
    assert cleared["type"] == "input_audio_buffer.cleared"
    # Everything after the clear: a new VAD, its items numbered on, times in the stream's clock.
    offset = session.position
    stream(session, check, pcm24(conversation), 2400, jobs)
    committed = check.of("input_audio_buffer.committed")
    assert dropped not in [e["item_id"] for e in committed]
    assert len(committed) == 4 and committed[1]["previous_item_id"] == committed[0]["item_id"]
    expected = reference_finals(pcm24(conversation), 2400, options)
    transcripts = [e["transcript"] for e in check.of(f"{TRANSCRIPT}.completed")]
    assert len(transcripts) == 4
    shifted = [f"<{j.segment + 2}:{j.start + offset}-{j.end + offset}>" for j, _ in expected]
    assert transcripts[1:] == shifted
    started = check.of("input_audio_buffer.speech_started")[2:]
    assert [e["audio_start_ms"] for e in started] == [(j.start + offset) * 1000 // SAMPLE_RATE for j, _ in expected]
    assert session.finalized == 4  # the dropped utterance (segment 1) counts as done
    assert_deltas_add_up(check)


def test_turning_vad_off_commits_the_open_utterance_and_on_hands_over_the_buffer(speech):
    session, check = new_session()
    jobs: list[Job] = []
    clip = pcm24(np.concatenate([GAP[:8000], speech["librivox-0880"]]))
    stream(session, check, clip[: len(clip) // 4 * 2], 4800, jobs)
    assert check.types()[-1] == "input_audio_buffer.speech_started"
    events = update(session, check, {"audio": {"input": {"turn_detection": None}}})
    assert [e["type"] for e in events] == ["input_audio_buffer.speech_stopped", *COMMIT_GA, "session.updated"]
    run_engine(session, check, jobs)
    assert len(jobs) == 1
    # Manual: the rest of the clip is buffered; turning the VAD on hands it over.
    stream(session, check, clip[len(clip) // 4 * 2 :] + pcm24(GAP), 4800, jobs)
    assert len(jobs) == 1
    events = update(session, check, {"audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
    assert [e["type"] for e in events][-1] == "session.updated"
    assert [e["type"] for e in events][:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    run_engine(session, check, jobs)
    assert [j.segment for j in jobs] == [0, 1] and jobs[1].start >= jobs[0].end
    assert jobs[1].end <= session.position
    assert len(check.of(f"{TRANSCRIPT}.completed")) == 2
    assert_deltas_add_up(check)


def test_beta_server_vad(conversation):
    session, check = new_session(beta=True)
    stream(session, check, pcm24(conversation), 4800)
    per_item = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", *COMMIT_BETA]
    per_item += [f"{TRANSCRIPT}.delta", f"{TRANSCRIPT}.completed"]
    assert check.types()[1:] == per_item * 3
    created = check.of("conversation.item.created")
    assert [e["previous_item_id"] for e in created] == [None, created[0]["item"]["id"], created[1]["item"]["id"]]
    assert_deltas_add_up(check)


def test_languages_reported_with_a_code_mapping(speech):
    options = RealtimeOptions(language_code=lambda name: {"English": "en"}.get(name))
    session, check = new_session(options)
    stream(session, check, pcm24(np.concatenate([GAP[:8000], speech["goforward"], GAP])), 4800)
    [completed] = check.of(f"{TRANSCRIPT}.completed")
    assert completed["languages"] == [{"code": "en"}]


# -- failures, the end -----------------------------------------------------------------------------


def test_a_failed_job_fails_its_item(conversation):
    session, check = new_session()
    data = pcm24(conversation)
    outcomes = iter(["fail", "ok", "fail"])
    for i in range(0, len(data), 4800):
        check(session.receive(append(data[i : i + 4800])))
        while (job := session.next_job()) is not None:
            if next(outcomes) == "fail":
                check(session.fail(job, "out of memory"))
            else:
                check(session.complete(job, [1], label(job), "English"))
    failed = check.of(f"{TRANSCRIPT}.failed")
    ids = [e["item_id"] for e in check.of("input_audio_buffer.committed")]
    assert [e["item_id"] for e in failed] == [ids[0], ids[2]]
    assert failed[0]["content_index"] == 0 and failed[0]["error"]["message"] == "out of memory"
    assert [e["item_id"] for e in check.of(f"{TRANSCRIPT}.completed")] == [ids[1]]
    assert session.finalized == 2


def test_speculative_failures(conversation):
    options = RealtimeOptions(SessionOptions(speculative_finals=True))
    session, check = new_session(options)
    data = pcm24(conversation)
    for i in range(0, len(data), 2400):
        check(session.receive(append(data[i : i + 2400])))
        while (job := session.next_job()) is not None:
            check(session.fail(job))
    ids = [e["item_id"] for e in check.of("input_audio_buffer.committed")]
    assert [e["item_id"] for e in check.of(f"{TRANSCRIPT}.failed")] == ids and len(ids) == 3
    assert not check.of(f"{TRANSCRIPT}.completed")


def test_abort_fails_every_committed_item(speech):
    session, check = new_session()
    manual(session, check)
    for name in ("goforward", "cards-001"):
        check(session.receive(append(pcm24(speech[name]))))
        check(session.receive(message("input_audio_buffer.commit")))
    job = session.next_job()
    assert job is not None
    check(session.complete(job, [1], "one", None))
    check(session.receive(append(pcm24(speech["cards-002"]))))  # not committed: no item
    events = check(session.abort("engine gone"))
    ids = [e["item_id"] for e in check.of("input_audio_buffer.committed")]
    assert [(e["type"], e["item_id"]) for e in events] == [(f"{TRANSCRIPT}.failed", ids[1])]
    assert session.closed and session.next_job() is None and session.receive(message("input_audio_buffer.clear")) == []


def test_finish_commits_the_open_utterance_and_close_drops_everything(speech):
    session, check = new_session()
    clip = pcm24(np.concatenate([GAP[:8000], speech["librivox-0880"]]))
    stream(session, check, clip, 4800)
    assert check.types()[-1] == "input_audio_buffer.speech_started"
    events = check(session.finish())
    assert [e["type"] for e in events] == ["input_audio_buffer.speech_stopped", *COMMIT_GA]
    assert session.finished and session.pending_finals == 1
    assert session.receive(append(clip)) == []  # no more audio
    job = session.next_job()
    assert job is not None and job.final
    assert [e["type"] for e in check(session.complete(job, [1], "end", None))][-1] == f"{TRANSCRIPT}.completed"

    session, check = new_session()
    data = clip + pcm24(GAP)
    for i in range(0, len(data), 4800):
        check(session.receive(append(data[i : i + 4800])))
    assert check.types()[-1] == "conversation.item.done"  # committed, its job not taken yet
    assert session.pending_finals == 1
    job = session.next_job()
    assert job is not None
    assert session.close() == [] and session.pending_finals == 0 and session.next_job() is None
    assert session.complete(job, [1], "late", None) == [] and session.stale(job)


def test_stale_speculations_in_a_renumbered_run(speech):
    """A speculative final held while its utterance goes on is stale once the utterance closes
    elsewhere (its result could only be a late partial), not when it closes at its end (its result is
    the transcript); one of an utterance dropped by a clear is stale. In a run after a clear, whose
    jobs are renumbered into the stream's clock."""
    session, check = new_session(RealtimeOptions(SessionOptions(speculative_finals=True)))
    check(session.receive(append(pcm24(GAP))))
    check(session.receive(message("input_audio_buffer.clear")))
    offset = session.position
    data = pcm24(np.concatenate([speech["two-cities"], GAP]))
    held: list[Job] = []
    outcomes: list[tuple[bool, list[str]]] = []  # per held speculation: stale when its utterance closed, its events
    for i in range(0, len(data), 960):
        events = check(session.receive(append(data[i : i + 960])))
        if any(e["type"] == "input_audio_buffer.committed" for e in events):
            for job in held:
                stale = session.stale(job)
                outcomes.append((stale, [e["type"] for e in check(session.complete(job, [1], label(job), None))]))
            held = []
        while (job := session.next_job()) is not None:
            assert job.start >= offset  # (the run before the clear had no utterance: numbers from 0)
            if job.speculative:
                assert not session.stale(job)
                held.append(job)
            else:
                check(session.complete(job, [1], label(job), None))
    assert {stale for stale, _ in outcomes} == {True, False}
    for stale, events in outcomes:
        assert events == ([] if stale else [f"{TRANSCRIPT}.delta", f"{TRANSCRIPT}.completed"])
    committed = [e["item_id"] for e in check.of("input_audio_buffer.committed")]
    completed = check.of(f"{TRANSCRIPT}.completed")
    assert [e["item_id"] for e in completed] == committed and len(committed) >= 5
    stopped = check.of("input_audio_buffer.speech_stopped")
    for event, end in zip(completed, stopped, strict=True):  # each transcript is of its utterance's audio
        assert int(event["transcript"][1:-1].split("-")[1]) * 1000 // SAMPLE_RATE == end["audio_end_ms"]
    assert session.finalized == len(committed) - 1
    assert_deltas_add_up(check)
    # A speculation of an utterance the client clears is stale.
    clip = pcm24(np.concatenate([GAP[:8000], speech["goforward"], GAP[:8000]]))
    speculation = None
    for i in range(0, len(clip), 960):
        check(session.receive(append(clip[i : i + 960])))
        if (speculation := session.next_job()) is not None:
            break  # (300 ms after the last voiced frame; the utterance ends at 600 ms)
    assert speculation is not None and speculation.speculative and not session.stale(speculation)
    check(session.receive(message("input_audio_buffer.clear")))
    assert session.stale(speculation) and session.complete(speculation, [1], "late", None) == []
    assert session.finalized == len(committed)  # the dropped utterance's state may go


def test_streaming_imports_no_server_side_library():
    code = (
        "import sys, asrlive.streaming._realtime; "
        "print(sorted({'torch', 'starlette', 'websockets', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_options_are_validated():
    with pytest.raises(ValueError):
        RealtimeOptions(max_buffer_s=0)
    assert replace(RealtimeOptions(), model="m").model == "m"
