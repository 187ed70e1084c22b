"""Protocol v1 (docs/protocol.md) as a state machine, sans-I/O: client messages in, events out.

``StreamProtocol`` is one session of ``/v1/stream`` or ``/v1/rtc``. The connection that drives it
(web/_connection.py) reads the client, hands each message over and sends what comes back, in
order; the scheduler drives it as the session's job source (``next_job``, ``complete``, ...). Every
ordering rule of the protocol (sections 5 and 6) is enforced here, whoever calls in what order::

    BEFORE_START --begin()--> STARTING --open()--> OPEN --finish--> FINISHING --done()--> DONE
         |                        |                 |                  ^
         +-- error, refusal, -----+                 +--- error ---> ERRORED --done()--+
             shutdown ---> DONE (no ``done`` event: nothing had started)

- ``ready`` is the first event; before it only an ``error`` (or nothing) is sent.
- After an ``error``, only the finals of received audio, the ``speech_stopped`` of the utterance the
  ending cuts short (``drain``), a second ``error`` (``internal_error``) and ``done`` follow.
- ``done`` is the last event; nothing after it is sent.
- ``internal_error`` (``fail``) loses the finals not yet sent: the connection skips the drain.

Audio arrives already decoded to 16 kHz (the transport's business: PCM frames or a WebRTC track).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from asrlive._words import Alignment

from ._events import SAMPLE_RATE, Event, Final, SpeechStopped
from ._protocol import CloseCode, ProtocolError, Start, parse_message
from ._session import Job, Session, SessionOptions

Message = dict[str, Any]


class State(enum.Enum):
    BEFORE_START = "before_start"  # waiting for ``start``
    STARTING = "starting"  # ``start`` accepted; the transport opens (WebRTC answers the offer)
    OPEN = "open"  # audio in, events out
    FINISHING = "finishing"  # ending without an error (finish, shutdown): drain, then ``done``
    ERRORED = "errored"  # ending after an ``error`` event: finals only, then ``done``
    DONE = "done"  # nothing more is sent; the close follows


@dataclass(frozen=True)
class StreamOptions:
    """What the server decides for every session of this protocol."""

    session: SessionOptions = field(default_factory=SessionOptions)
    max_session_s: float = 4 * 3600.0
    max_frame_bytes: int = 256 * 1024
    idle_timeout_s: float = 30.0
    protocol_version: int = 1
    model: str = "qwen3-asr"
    # What only the server can check of a start: returns the model's name for its language (None:
    # detect); raises ProtocolError (``bad_start``) for a language, context or option it refuses.
    check_start: Callable[[Start], str | None] = lambda start: start.language


class StreamProtocol:
    """One v1 session (see the module docstring). ``session_id`` names it in ``ready``."""

    def __init__(self, options: StreamOptions, session_id: str) -> None:
        self.options = options
        self.id = session_id
        self.state = State.BEFORE_START
        self.start: Start | None = None  # the accepted start
        self.language: str | None = None  # the model's name for the start's language; None: detect
        self._session: Session | None = None
        self._received = 0  # 16 kHz samples fed to the session
        self._ending: tuple[CloseCode, str] = (CloseCode.GOING_AWAY, "shutdown")
        self._failed = False

    # -- where the session stands ----------------------------------------------------------------

    @property
    def started(self) -> bool:
        """A session exists: its audio gets finals and the ending a ``done``."""
        return self._session is not None

    @property
    def opening(self) -> bool:
        """``start`` was accepted: the transport opens, then ``open``."""
        return self.state is State.STARTING

    @property
    def receiving(self) -> bool:
        """Whether the client's messages are still read."""
        return self.state in (State.BEFORE_START, State.OPEN)

    @property
    def failed(self) -> bool:
        """``internal_error`` is out: the finals not yet sent are lost (no drain)."""
        return self._failed

    @property
    def closing(self) -> tuple[CloseCode, str]:
        """The close code and reason of the ending (meaningful once ``receiving`` is false)."""
        return self._ending

    @property
    def position(self) -> int:
        """16 kHz samples received so far."""
        return self._received

    @property
    def idle_timeout_s(self) -> float | None:
        return self.options.idle_timeout_s if self.receiving else None

    # -- the client's messages -------------------------------------------------------------------

    def begin(self, start: Start) -> list[Message]:
        """A parsed ``start`` (the transport parses its own variant): checked; STARTING, or the
        error. Nothing is sent yet: ``ready`` comes with ``open`` once the transport is ready."""
        if self.state is not State.BEFORE_START:
            return self.error(ProtocolError("already_started", "the session has already started"))
        try:
            self.language = self.options.check_start(start)
        except ProtocolError as error:
            return self.error(error)
        self.start = start
        self.state = State.STARTING
        return []

    def open(self, transport_fields: dict[str, Any]) -> list[Message]:
        """The transport is ready (``sample_rate``, ``encoding`` of the audio it delivers): ``ready``."""
        if self.state is not State.STARTING:
            return []
        start = self.start
        assert start is not None
        interval = start.partial_interval_ms or self.options.session.partial_interval_ms
        # Speculative finals: the server's scheduler releases the engine state of a final computed as a partial.
        options = replace(
            self.options.session, partials=start.partials, partial_interval_ms=interval, speculative_finals=True
        )
        self._session = Session(options)
        self.state = State.OPEN
        limits = {
            "max_frame_bytes": self.options.max_frame_bytes,
            "idle_timeout_s": self.options.idle_timeout_s,
            "max_session_s": self.options.max_session_s,
        }
        ready = {
            "type": "ready",
            "protocol": self.options.protocol_version,
            "session": self.id,
            "model": self.options.model,
            "language": self.language,
            **transport_fields,
            "partials": start.partials,
            "partial_interval_ms": interval,
            "timestamps": start.timestamps,
            "limits": limits,
        }
        return [ready]

    def receive_text(self, text: str) -> list[Message]:
        """A text message after ``start``: ``finish`` ends the session; anything else is an error."""
        if self.state is not State.OPEN:
            return []
        try:
            parse_message(text, started=True)  # anything but a valid finish raises
        except ProtocolError as error:
            return self.error(error)
        self._end(State.FINISHING, CloseCode.NORMAL, "finish")
        return []

    def receive_audio(self, pcm: np.ndarray) -> list[Message]:
        """16 kHz audio; the part past ``max_session_s`` is cut off with ``session_too_long``."""
        if self.state is not State.OPEN:
            return []
        allowed = max(round(self.options.max_session_s * SAMPLE_RATE) - self._received, 0)
        events = self._feed(pcm[:allowed])
        if pcm.size > allowed:
            limit = f"sessions are limited to {self.options.max_session_s:g} s of audio"
            events += self.error(ProtocolError("session_too_long", limit))
        return events

    def timed_out(self) -> list[Message]:
        """Nothing came for ``idle_timeout_s``."""
        timeout = f"nothing received for {self.options.idle_timeout_s:g} s; closing"
        return self.error(ProtocolError("idle_timeout", timeout))

    def error(self, error: ProtocolError) -> list[Message]:
        """The client broke the protocol (or was refused): the ``error`` event, and the session ends."""
        if self.state in (State.ERRORED, State.DONE):
            return []
        self._end(State.ERRORED if self.started else State.DONE, error.close_code, error.code)
        return [error.to_json()]

    def shutdown(self) -> list[Message]:
        """The server is stopping: a started session drains to its finals, then ``done: shutdown``."""
        if self.receiving or self.state is State.STARTING:
            self._end(State.FINISHING if self.started else State.DONE, CloseCode.GOING_AWAY, "shutdown")
        return []

    def fail(self, what: str) -> list[Message]:
        """The server failed (inference, its own code, sending): ``internal_error`` once; the finals
        not yet sent are lost, ``done`` and the close say ``internal_error``."""
        if self._failed or self.state is State.DONE:
            return []
        self._failed = True
        error = ProtocolError("internal_error", what)
        self._end(State.ERRORED if self.started else State.DONE, error.close_code, error.code)
        return [error.to_json()]

    # -- the ending ------------------------------------------------------------------------------

    def drain(self) -> list[Message]:
        """The utterance the ending cuts short closes (its ``speech_stopped``, reason ``finish``, may
        follow an error) and every utterance gets its final job; the results follow as they come."""
        if self._session is None or self.state not in (State.FINISHING, State.ERRORED) or self._failed:
            return []
        events = self._session.finish()
        return [event.to_json() for event in events if self._allowed(event, draining=True)]

    def done(self, audio_seconds: float) -> list[Message]:
        """``done``, the last event (none for a session that never started); DONE."""
        if self.state is State.DONE:
            return []
        self.state = State.DONE
        if self._session is None:
            return []
        reason = self._ending[1]
        return [{"type": "done", "reason": reason, "audio_seconds": audio_seconds, "segments": self._session.segments}]

    def lag(self, seconds: float) -> list[Message]:
        """``lag`` while the session is live (after an error it is no news: the session is ending)."""
        if self.state not in (State.OPEN, State.FINISHING) or self._session is None:
            return []
        return [{"type": "lag", "seconds": round(seconds, 3), "pending_finals": self._session.pending_finals}]

    def _end(self, state: State, code: CloseCode, reason: str) -> None:
        self.state = state
        self._ending = (code, reason)

    # -- the scheduler's side (a job source, as ``Session``) -------------------------------------

    @property
    def finished(self) -> bool:
        return self._session is not None and self._session.finished

    @property
    def finalized(self) -> int:
        return self._session.finalized if self._session is not None else -1

    @property
    def pending_finals(self) -> int:
        return self._session.pending_finals if self._session is not None else 0

    @property
    def segments(self) -> int:
        return self._session.segments if self._session is not None else 0

    def next_job(self, partials: bool = True) -> Job | None:
        if self._session is None or self._failed or self.state is State.DONE:
            return None
        return self._session.next_job(partials=partials)

    def stale(self, job: Job) -> bool:
        return self._session is None or self._session.stale(job)

    def complete(
        self, job: Job, token_ids: Sequence[int], text: str, language: str | None, alignment: Alignment | None = None
    ) -> list[Message]:
        """The engine's result for ``job``: the events the protocol lets through now."""
        if self._session is None or self._failed:
            return []
        events = self._session.complete(job, token_ids, text, language, alignment)
        return [event.to_json() for event in events if self._allowed(event)]

    def _feed(self, pcm: np.ndarray) -> list[Message]:
        if not pcm.size or self._session is None:
            return []
        self._received += pcm.size
        return [event.to_json() for event in self._session.feed(pcm) if self._allowed(event)]

    def _allowed(self, event: Event, draining: bool = False) -> bool:
        """Whether an event may go out now (section 5): after an error, only finals (and the
        ``speech_stopped`` of the drain); after ``done`` nothing."""
        if self.state is State.DONE:
            return False
        if self.state is not State.ERRORED:
            return True
        return isinstance(event, Final) or (draining and isinstance(event, SpeechStopped))
