"""OpenAI's Realtime transcription API, sans-I/O: client events in, server events and jobs out.

``/v1/realtime?intent=transcription`` speaks the protocol of OpenAI's Realtime API for transcription
sessions, so that the unmodified ``openai`` SDK transcribes against asrlive. The event and field
names are the SDK's: GA by default (``openai.types.realtime``), beta (``openai.types.beta.realtime``)
for a client that sends ``OpenAI-Beta: realtime=v1``. Like ``Session``, a ``RealtimeSession`` does no
I/O: the transport hands it each client text message and sends the events it returns, as JSON, in
order; whoever owns the model asks for jobs and hands the results back::

    send(session.opened())                             # session.created
    for text in websocket:                             # until the client goes
        send(session.receive(text))
        while (job := session.next_job()) is not None:  # asrlive's streaming.Job
            hypothesis = engine.transcribe(job.segment, job.audio, job.final)
            send(session.complete(job, hypothesis.token_ids, hypothesis.text, hypothesis.language))
            # an engine failure: send(session.fail(job, "...")), or send(session.abort("...")) for all
    session.close()                                    # the client went: nothing more is due
    # (a server shutting down gracefully calls send(session.finish()) instead and completes the
    # jobs still due: the open utterance is committed and transcribed.)

It offers the scheduler what a ``Session`` does (``next_job``, ``complete``, ``stale``, ``finalized``,
``finished``, ``pending_finals``, ``segments``), with events as JSON objects. Decoding options come
from ``language`` (the model's name, None: detect) and ``context`` (the prompt): they may change with
any ``session.update`` and apply to the jobs handed out after it.

Events (client -> server; GA names, beta where they differ):

=============================================  ====================================================
client                                         server
=============================================  ====================================================
(connection opens)                             ``session.created`` (beta ``transcription_session.created``)
``session.update`` (beta ``transcription_      ``session.updated`` (beta ``transcription_session.
session.update``)                              updated``), after any events the change causes
``input_audio_buffer.append``                  (server_vad) per utterance, as the VAD decides:
                                               ``input_audio_buffer.speech_started``, later
                                               ``input_audio_buffer.speech_stopped``, then a commit
``input_audio_buffer.commit``                  a commit: ``input_audio_buffer.committed``,
                                               ``conversation.item.added`` + ``conversation.item.done``
                                               (beta ``conversation.item.created``); in server_vad
                                               mode it ends the open utterance now (no speech_stopped)
``input_audio_buffer.clear``                   ``input_audio_buffer.cleared``
(the item's transcript, from ``complete``)     ``conversation.item.input_audio_transcription.delta``
                                               then ``...completed`` (or ``...failed``)
anything wrong, or another type                ``error`` (the session goes on)
=============================================  ====================================================

Items. One utterance (server_vad, semantic_vad) or one commit (manual, ``turn_detection: null``) is
one user message item, ``item_...``; ``previous_item_id`` chains the items in commit order. Its
transcript is the engine's final for its audio: in VAD mode a real ``Session`` with the server's
``SessionOptions`` (the turn detection fields mapped onto its ``VadOptions``, see
``TurnDetection.vad``) segments the stream and makes the jobs, so with the default turn detection
the transcripts are ``/v1/stream``'s finals for the same audio. Partials are never asked for: their
text may still change, and the deltas must add up to the completed transcript, so the one delta is
the whole final, just before ``completed`` (none when the transcript is empty). Times (``audio_start_ms``,
``audio_end_ms``) are milliseconds of the session's audio, from its first append.

Mode changes. A change of turn detection (or a server_vad commit, or a clear) ends the current VAD
run: the open utterance is committed (cleared, for a clear) and a fresh VAD starts at the current
position; a switch to server_vad hands the uncommitted audio to the new VAD. Jobs of an earlier run
keep their item and are still transcribed. A format change flushes the resampler first.

Bounds. A VAD run holds what its ``Session`` holds (the open utterance, at most
``max_utterance_s``). Manual mode holds the uncommitted audio up to ``max_buffer_s`` (15 minutes by
default, 58 MB at 16 kHz float32); beyond it the oldest audio is dropped and one ``error``
(``input_audio_buffer_overflow``) says so, until the next commit or clear. A commit needs 100 ms of
audio, as OpenAI's does (``input_audio_buffer_commit_empty``).

Approximate: semantic_vad (eagerness scales the trailing silence; there is no turn model), threshold
(4 webrtcvad modes), ``prefix_padding_ms`` (also the padding after speech), and the accepted but
ineffective fields listed in ``_realtime_config``. Usage is reported as the duration of the item.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from ._events import SAMPLE_RATE, Event, Final, SpeechStarted, SpeechStopped
from ._protocol import ProtocolError, decode_message, quote
from ._realtime_audio import InputDecoder, decode_base64
from ._realtime_config import RealtimeError, decoding, default_config, session_object, update_beta, update_ga
from ._realtime_events import EventWriter
from ._session import Job, Session, SessionOptions

MIN_COMMIT_SAMPLES = SAMPLE_RATE // 10  # 100 ms
MAX_EVENT_ID_CHARS = 512
_UNSUPPORTED = (
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "output_audio_buffer.clear",
    "response.cancel",
    "response.create",
)


@dataclass(frozen=True)
class RealtimeOptions:
    session: SessionOptions = field(default_factory=SessionOptions)  # the server's (VAD, speculation)
    model: str = "qwen3-asr"  # the transcription model a session reports until the client names another
    # The model's name for a client's language (ISO-639-1 code or name), None for detection; raises
    # ValueError for a language the model lacks. None: the client's text as it is ("auto": detect).
    language: Callable[[str], str | None] | None = None
    # The ISO-639-1 code of a model's language name, for ``languages`` of ``...completed`` (GA).
    language_code: Callable[[str], str | None] | None = None
    # Raises ValueError or ProtocolError for a prompt that may not reach the model (control tokens).
    check_prompt: Callable[[str], None] | None = None
    max_buffer_s: float = 900.0  # manual mode: uncommitted audio kept

    def __post_init__(self) -> None:
        if self.max_buffer_s < 1:
            raise ValueError("max_buffer_s must be at least 1")


@dataclass(eq=False)
class _Run:
    """One VAD run: a ``Session`` whose sample 0 is ``sample_base`` of the stream and whose segment 0
    is ``segment_base``."""

    session: Session
    sample_base: int
    segment_base: int
    open: _Item | None = None  # the utterance open now
    # Speculative jobs handed out renumbered: the Session knows them by identity (a few at a time).
    speculative: OrderedDict[int, tuple[Job, Job]] = field(default_factory=OrderedDict)

    @property
    def identity(self) -> bool:
        return self.sample_base == 0 and self.segment_base == 0

    def hand_out(self, job: Job) -> Job:
        if self.identity:
            return job
        base = self.sample_base
        mapped = replace(job, segment=job.segment + self.segment_base, start=job.start + base, end=job.end + base)
        if job.speculative:
            self.speculative[id(mapped)] = (mapped, job)
            while len(self.speculative) > 8:  # results of older ones are stale by now
                self.speculative.popitem(last=False)
        return mapped

    def original(self, job: Job) -> Job | None:
        if self.identity:
            return job
        if job.speculative:
            known = self.speculative.pop(id(job), None)
            return known[1] if known is not None and known[0] is job else None
        base = self.sample_base
        return replace(job, segment=job.segment - self.segment_base, start=job.start - base, end=job.end - base)


@dataclass(eq=False)
class _Item:
    id: str
    segment: int
    run: _Run | None  # None: a manual commit
    committed: bool = False
    failed: bool = False  # its final job failed
    failed_bounds: tuple[int, int] | None = None  # a speculative job on these bounds (run samples) failed


class RealtimeSession:
    """One Realtime transcription connection (see the module docstring)."""

    def __init__(self, options: RealtimeOptions = RealtimeOptions(), beta: bool = False, expires_at: int | None = None):
        self.options = options
        self.beta = beta
        self.expires_at = expires_at
        self.id = "sess_" + secrets.token_hex(10)
        self._write = EventWriter(beta)
        self._config = default_config(options.session.vad, options.model)
        self.language: str | None = None  # the model's name; None: detect
        self.context = ""
        self._decoder = InputDecoder(self._config.format)
        self._position = 0  # samples of the 16 kHz stream so far
        self._next_segment = 0
        self._items: dict[int, _Item] = {}  # by segment: items not yet transcribed
        self._last_item: str | None = None
        self._done: set[int] = set()
        self._finalized = -1
        self._retired: list[_Run] = []  # earlier VAD runs with work left
        self._run: _Run | None = self._new_run(0)
        self._chunks: deque[npt.NDArray[np.float32]] = deque()  # manual mode: uncommitted audio
        self._buffered = 0
        self._overflowed = False
        self._manual_jobs: deque[Job] = deque()
        self.finished = False  # finish() or close(): no more audio
        self.closed = False  # close(): nothing more is due

    # -- the scheduler's view (as Session's) -----------------------------------------------------

    @property
    def finalized(self) -> int:
        """Every segment up to this one has its transcript out (or was dropped): its engine state may go."""
        return self._finalized

    @property
    def pending_finals(self) -> int:
        if self.closed:
            return 0
        runs = [*self._retired, *([self._run] if self._run else [])]
        return len(self._manual_jobs) + sum(run.session.pending_finals for run in runs)

    @property
    def segments(self) -> int:
        run = self._run
        return run.segment_base + run.session.segments if run is not None else self._next_segment

    @property
    def position(self) -> int:
        """Samples of 16 kHz audio received so far."""
        return self._position

    def next_job(self, partials: bool = True) -> Job | None:
        """The next transcription job: a final (or a speculative final); never a partial."""
        if self.closed:
            return None
        self._retired = [run for run in self._retired if self._busy(run)]
        for run in self._retired:
            job = run.session.next_job(partials=False)
            if job is not None:
                return run.hand_out(job)
        if self._manual_jobs:
            return self._manual_jobs.popleft()
        if self._run is not None:
            job = self._run.session.next_job(partials=False)
            if job is not None:
                return self._run.hand_out(job)
        return None

    def complete(
        self, job: Job, token_ids: Sequence[int], text: str, language: str | None, alignment: object = None
    ) -> list[dict[str, Any]]:
        """The engine's hypothesis for ``job``: the events to send (perhaps none yet). ``alignment`` is
        accepted for the scheduler's sake and unused."""
        item = None if self.closed else self._items.get(job.segment)
        if item is None:  # dropped by a clear, or the session is closed
            return []
        if item.run is None:
            return self._transcript(item, text, language, job.start, job.end)
        original = item.run.original(job)
        if original is None:
            return []
        return self._translate(item.run, item.run.session.complete(original, token_ids, text, language))

    def fail(self, job: Job, message: str = "transcription failed") -> list[dict[str, Any]]:
        """The engine failed on ``job``: its item's ``...failed``, now or when the item is committed
        (a speculative final), and nothing for a job whose item gets its transcript from another."""
        item = None if self.closed else self._items.get(job.segment)
        if item is None:
            return []
        if item.run is None:
            item.failed = True
            return self._transcript(item, "", None, job.start, job.end, message)
        original = item.run.original(job)
        if original is None:
            return []
        if original.final:
            item.failed = True
        else:
            item.failed_bounds = (original.start, original.end)
        # The Session's bookkeeping goes on as if the result were empty; _translate says failed.
        return self._translate(item.run, item.run.session.complete(original, (), "", None), message)

    def stale(self, job: Job) -> bool:
        """Whether ``job``'s result could only be dropped: its item went (or got its transcript from
        another job), or it is a speculation that did not come true (``Session.stale``)."""
        item = None if self.closed else self._items.get(job.segment)
        if item is None:
            return True
        if job.final or item.run is None:
            return False
        if item.run is not self._run and not item.committed:
            return True  # its run was cleared
        original = job
        if not item.run.identity:
            known = item.run.speculative.get(id(job))
            if known is None or known[0] is not job:
                return True  # forgotten: superseded long ago
            original = known[1]
        return item.run.session.stale(original)

    # -- the transport's side --------------------------------------------------------------------

    def opened(self) -> list[dict[str, Any]]:
        """The first event: the session's configuration."""
        kind = "transcription_session.created" if self.beta else "session.created"
        return [self._write.event(kind, session=self._session_object())]

    def receive(self, text: str) -> list[dict[str, Any]]:
        """One client text message: the events to send now (``error`` for anything wrong)."""
        if self.finished:
            return []
        try:
            message = decode_message(text)
        except ProtocolError as exc:
            return [self._write.error(RealtimeError("invalid_json", exc.message), _salvage_event_id(text))]
        event_id = message.get("event_id")
        if event_id is not None and not _echoable(event_id):
            problem = RealtimeError(
                "invalid_value", f"event_id must be a string of at most {MAX_EVENT_ID_CHARS} characters", "event_id"
            )
            return [self._write.error(problem, None)]
        try:
            return self._dispatch(message["type"], message, event_id)
        except RealtimeError as exc:
            return [self._write.error(exc, event_id)]

    def finish(self) -> list[dict[str, Any]]:
        """No more audio (the server ends the session gracefully): the open utterance (server_vad)
        is committed, and the jobs still due go on; uncommitted manual audio is dropped."""
        if self.finished:
            return []
        self.finished = True
        events = self._feed(self._decoder.flush(), None)
        if self._run is not None:
            events += self._translate(self._run, self._run.session.finish())
        self._clear_buffer()
        return events

    def expire(self, message: str) -> list[dict[str, Any]]:
        """The session reached the server's length limit: ``error`` (``session_expired``, as OpenAI
        says it), then ``finish()``: what was committed or spoken is still transcribed."""
        if self.finished:
            return []
        return [self._write.error(RealtimeError("session_expired", message), None), *self.finish()]

    def close(self) -> list[dict[str, Any]]:
        """The client went: nothing more is due; every job and all audio are dropped."""
        self.finished = self.closed = True
        self._run, self._retired = None, []
        self._items.clear()
        self._manual_jobs.clear()
        self._clear_buffer()
        return []

    def abort(self, message: str = "transcription failed") -> list[dict[str, Any]]:
        """The engine is gone: ``...failed`` for every committed item without its transcript, then closed."""
        events = [self._failed(item, message) for item in list(self._items.values()) if item.committed]
        self.close()
        return events

    # -- client events ---------------------------------------------------------------------------

    def _dispatch(self, kind: str, message: dict[str, Any], event_id: str | None) -> list[dict[str, Any]]:
        update = "transcription_session.update" if self.beta else "session.update"
        if kind == update:
            _known(message, ("type", "event_id", "session"))
            if "session" not in message:
                raise RealtimeError("missing_required_parameter", "Missing required parameter: 'session'.", "session")
            return self._update(message["session"])
        if kind == "input_audio_buffer.append":
            _known(message, ("type", "event_id", "audio"))
            audio = message.get("audio")
            if not isinstance(audio, str):
                if "audio" not in message:
                    raise RealtimeError("missing_required_parameter", "Missing required parameter: 'audio'.", "audio")
                raise RealtimeError("invalid_type", "Invalid type for 'audio': expected a base64 string.", "audio")
            return self._append(audio, event_id)
        if kind == "input_audio_buffer.commit":
            _known(message, ("type", "event_id"))
            return self._commit(event_id)
        if kind == "input_audio_buffer.clear":
            _known(message, ("type", "event_id"))
            return self._clear()
        supported = f"'{update}', 'input_audio_buffer.append', 'input_audio_buffer.commit', 'input_audio_buffer.clear'"
        if kind in _UNSUPPORTED or kind in ("session.update", "transcription_session.update"):
            problem = f"{quote(kind)} is not supported in this transcription session: send {supported}."
        else:
            problem = f"Invalid value: {quote(kind)}. Supported values are: {supported}."
        raise RealtimeError("invalid_value", problem, "type")

    def _update(self, value: Any) -> list[dict[str, Any]]:
        vad, model = self.options.session.vad, self.options.model
        parse = update_beta if self.beta else update_ga
        config = parse(value, self._config, vad, model)
        # Everything is checked before anything changes.
        language, context = decoding(config, self.options.language, self.options.check_prompt, self.beta)
        events: list[dict[str, Any]] = []
        if config.format != self._config.format:
            events += self._feed(self._decoder.flush(), None)
            self._decoder = InputDecoder(config.format)
        old = self._config.turn_detection.vad(vad) if self._config.turn_detection else None
        new = config.turn_detection.vad(vad) if config.turn_detection else None
        self._config, self.language, self.context = config, language, context
        if old != new:
            events += self._restart(commit=True)
        kind = "transcription_session.updated" if self.beta else "session.updated"
        return [*events, self._write.event(kind, session=self._session_object())]

    def _append(self, audio: str, event_id: str | None) -> list[dict[str, Any]]:
        try:
            data = decode_base64(audio)
        except ValueError:
            message = "Invalid 'audio': expected base64-encoded audio bytes (standard alphabet, padded)."
            raise RealtimeError("invalid_value", message, "audio") from None
        return self._feed(self._decoder.decode(data), event_id)

    def _commit(self, event_id: str | None) -> list[dict[str, Any]]:
        if self._run is not None:
            if self._run.open is None:
                raise RealtimeError(
                    "input_audio_buffer_commit_empty", "Error committing input audio buffer: no speech in the buffer."
                )
            return self._restart(commit=True, manual=True)
        events = self._feed(self._decoder.flush(), event_id)
        if self._buffered < MIN_COMMIT_SAMPLES:
            raise RealtimeError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but "
                f"buffer only has {self._buffered / (SAMPLE_RATE / 1000):.2f}ms of audio.",
            )
        audio = np.concatenate(self._chunks)
        item = self._new_item(self._next_segment, None)
        self._next_segment += 1
        self._manual_jobs.append(Job(item.segment, self._position - audio.size, self._position, True, audio))
        self._clear_buffer()
        return events + self._committed(item)

    def _clear(self) -> list[dict[str, Any]]:
        self._position += self._decoder.flush().size  # heard, and cleared
        self._clear_buffer()
        if self._run is not None:
            self._restart(commit=False)
        return [self._write.event("input_audio_buffer.cleared")]

    # -- audio and VAD runs ----------------------------------------------------------------------

    def _feed(self, pcm: npt.NDArray[np.float32], event_id: str | None) -> list[dict[str, Any]]:
        if not pcm.size:
            return []
        self._position += pcm.size
        if self._run is not None:
            return self._translate(self._run, self._run.session.feed(pcm))
        self._chunks.append(pcm)
        self._buffered += pcm.size
        excess = self._buffered - int(self.options.max_buffer_s * SAMPLE_RATE)
        if excess <= 0:
            return []
        self._buffered -= excess
        while excess:
            oldest = self._chunks[0]
            if oldest.size <= excess:
                self._chunks.popleft()
                excess -= oldest.size
            else:
                self._chunks[0], excess = oldest[excess:].copy(), 0
        if self._overflowed:
            return []
        self._overflowed = True
        problem = RealtimeError(
            "input_audio_buffer_overflow",
            f"The input audio buffer holds at most {self.options.max_buffer_s:g} s of uncommitted audio: "
            "the oldest audio is dropped. Commit or clear it.",
        )
        return [self._write.error(problem, event_id)]

    def _clear_buffer(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        self._overflowed = False

    def _new_run(self, sample_base: int) -> _Run | None:
        turn = self._config.turn_detection
        if turn is None:
            return None
        options = replace(self.options.session, vad=turn.vad(self.options.session.vad))
        return _Run(Session(options), sample_base, self._next_segment)

    def _restart(self, commit: bool, manual: bool = False) -> list[dict[str, Any]]:
        """End the current VAD run (its open utterance committed, or dropped) and start the current
        mode afresh at this point; manual -> VAD hands the uncommitted audio to the new run."""
        events: list[dict[str, Any]] = []
        run, self._run = self._run, None
        start = self._position
        if run is not None:
            if commit:  # a commit by the client is not a speech_stopped (as OpenAI has it)
                events += self._translate(run, run.session.finish(), suppress_stopped=manual)
            elif run.open is not None:
                self._retire(run.open)
                run.open = None
            self._next_segment = run.segment_base + run.session.segments
            if self._busy(run):
                self._retired.append(run)
        elif self._config.turn_detection is not None:  # from manual mode: the uncommitted audio goes on
            start = self._position - self._buffered
        self._run = self._new_run(start)
        if self._run is not None and self._chunks:
            self._position = start
            events += self._feed(np.concatenate(self._chunks), None)
            self._clear_buffer()
        return events

    def _busy(self, run: _Run) -> bool:
        return bool(run.session.pending_finals) or any(item.run is run for item in self._items.values())

    # -- server events ---------------------------------------------------------------------------

    def _translate(
        self, run: _Run, events: list[Event], failure: str | None = None, suppress_stopped: bool = False
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event in events:
            segment = run.segment_base + event.segment
            if isinstance(event, SpeechStarted):
                run.open = self._new_item(segment, run)
                ms = _ms(run.sample_base + event.start)
                started = self._write.event("input_audio_buffer.speech_started", audio_start_ms=ms, item_id=run.open.id)
                out.append(started)
            elif isinstance(event, SpeechStopped):
                item, run.open = self._items[segment], None
                if not suppress_stopped:
                    ms = _ms(run.sample_base + event.end)
                    stopped = self._write.event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item.id)
                    out.append(stopped)
                out += self._committed(item)
            elif isinstance(event, Final) and segment in self._items:
                item = self._items[segment]
                if item.failed_bounds == (event.start, event.end):
                    item.failed = True
                start, end = run.sample_base + event.start, run.sample_base + event.end
                out += self._transcript(item, event.text, event.language, start, end, failure)
        return out

    def _new_item(self, segment: int, run: _Run | None) -> _Item:
        item = _Item(self._write.item_id(), segment, run)
        self._items[segment] = item
        return item

    def _committed(self, item: _Item) -> list[dict[str, Any]]:
        item.committed = True
        previous, self._last_item = self._last_item, item.id
        return self._write.committed(item.id, previous)

    def _transcript(
        self, item: _Item, text: str, language: str | None, start: int, end: int, failure: str | None = None
    ) -> list[dict[str, Any]]:
        self._retire(item)
        if item.failed:
            return [self._failed(item, failure or "transcription failed")]
        to_code = self.options.language_code
        code = to_code(language) if to_code is not None and language else None
        return self._write.transcript(item.id, text, (end - start) / SAMPLE_RATE, code)

    def _failed(self, item: _Item, message: str) -> dict[str, Any]:
        self._retire(item)
        return self._write.failed(item.id, message)

    def _retire(self, item: _Item) -> None:
        """The item needs nothing more: forget it, and advance ``finalized`` over what is done."""
        self._items.pop(item.segment, None)
        self._done.add(item.segment)
        while self._finalized + 1 in self._done:
            self._finalized += 1
            self._done.discard(self._finalized)

    def _session_object(self) -> dict[str, Any]:
        return session_object(self._config, self.id, self.expires_at, self.beta)


def _ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE


def _known(message: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in message:
        if name not in names:
            param = name if len(name) <= 64 and name.isascii() and name.isprintable() else None
            raise RealtimeError("unknown_parameter", f"Unknown parameter: {quote(name)}.", param)


def _salvage_event_id(text: str) -> str | None:
    """The event_id of a message refused as a whole (no string type, ...), to echo it if there is one."""
    if len(text) > 1 << 16:
        return None
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None
    event_id = message.get("event_id") if isinstance(message, dict) else None
    return event_id if _echoable(event_id) else None


def _echoable(event_id: object) -> bool:
    """A client's event_id this server repeats in an error: a short string of Unicode scalar values."""
    if not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID_CHARS:
        return False
    try:
        event_id.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: unsendable as UTF-8
        return False
    return True
