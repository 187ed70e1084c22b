"""What differs between the session endpoints: the wire format around each protocol's sans-I/O core.

A ``Codec`` is what ``Connection`` (web/_connection.py) drives: it turns what the transport
delivers into the core's calls and the core's answers into JSON events, and says where the session
stands (still reading? failed? how to close?). The cores hold the protocol's rules:
``StreamProtocol`` (asrlive's protocol v1, streaming/_v1.py) for ``/v1/stream`` and ``/v1/rtc``,
``RealtimeSession`` (OpenAI's Realtime API, streaming/_realtime.py) for ``/v1/realtime``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from asrlive.streaming import SAMPLE_RATE, CloseCode, Job, ProtocolError
from asrlive.streaming._realtime import RealtimeSession
from asrlive.streaming._v1 import State, StreamProtocol

if TYPE_CHECKING:
    from asrlive.engine import DecodingOptions

    from ._scheduler import JobSource
    from ._transport import StreamTransport

Message = dict[str, Any]


class Codec(Protocol):
    """One endpoint's protocol, as the connection drives it."""

    @property
    def source(self) -> JobSource | None: ...  # the session the scheduler transcribes, once there is one
    @property
    def timestamps(self) -> bool: ...  # its finals carry word times
    @property
    def receiving(self) -> bool: ...  # the client's messages are still read
    @property
    def failed(self) -> bool: ...  # the server failed the session: nothing more is transcribed
    @property
    def idle_timeout_s(self) -> float | None: ...  # None: the protocol has none
    @property
    def position(self) -> int: ...  # 16 kHz samples received
    @property
    def closing(self) -> tuple[int, str]: ...  # the close code and reason of the ending

    def decoding(self) -> DecodingOptions: ...  # for the jobs admitted from now on
    def opened(self) -> list[Message]: ...  # the first events, before anything is read
    async def receive(self, message: Any) -> list[Message]: ...  # one message from the transport
    def error(self, error: ProtocolError) -> list[Message]: ...  # the transport's refusal of the input
    def timed_out(self) -> list[Message]: ...  # nothing came for idle_timeout_s
    def shutdown(self) -> list[Message]: ...  # the server is stopping
    def fail(self, what: str) -> list[Message]: ...  # the server failed (internal_error)
    def gone(self) -> None: ...  # the client went: nothing more is due
    def drain(self) -> list[Message]: ...  # the ending: everything heard gets its result
    def done(self) -> list[Message]: ...  # the last events
    def lag(self, seconds: float) -> list[Message]: ...  # the results are this late
    # (is it a final, the 16 kHz sample its audio ends at) for each result among ``events``; ``job``:
    # the job they are the result of (None: events of the drain)
    def results(self, job: Job | None, events: list[Message]) -> list[tuple[bool, int]]: ...


class StreamCodec:
    """Protocol v1 (docs/protocol.md) over a WebSocket or WebRTC transport."""

    def __init__(self, core: StreamProtocol, transport: StreamTransport, decoding: DecodingOptions) -> None:
        self.core = core
        self.transport = transport
        self._decoding = decoding

    @property
    def source(self) -> StreamProtocol | None:
        return self.core if self.core.started else None

    @property
    def timestamps(self) -> bool:
        return self.core.start is not None and self.core.start.timestamps

    @property
    def receiving(self) -> bool:
        return self.core.receiving

    @property
    def failed(self) -> bool:
        return self.core.failed

    @property
    def idle_timeout_s(self) -> float | None:
        return self.core.idle_timeout_s

    @property
    def position(self) -> int:
        return self.core.position

    @property
    def closing(self) -> tuple[int, str]:
        return self.core.closing

    def decoding(self) -> DecodingOptions:
        start = self.core.start
        context = start.context if start is not None else ""
        return replace(self._decoding, language=self.core.language, context=context)

    def opened(self) -> list[Message]:
        return []

    async def receive(self, message: str | np.ndarray) -> list[Message]:
        core = self.core
        if core.state is State.BEFORE_START:
            if not isinstance(message, str):  # a transport that cannot receive audio before start never gets here
                return core.error(ProtocolError("not_started", 'send a "start" message before any audio'))
            try:
                start = self.transport.parse_start(message)
            except ProtocolError as error:
                return core.error(error)
            events = core.begin(start)  # checked before the transport opens: no WebRTC answer for a bad start
            if core.opening:
                try:
                    events += core.open(await self.transport.open(start))
                except ProtocolError as error:
                    events += core.error(error)
            return events
        if isinstance(message, str):  # any text ends an open session (finish, or an error)
            return self._tail() + core.receive_text(message)
        return core.receive_audio(message)

    def _tail(self) -> list[Message]:
        """The resampler's tail, before the ending: it may still open an utterance, and after an
        error no speech_started may come (protocol section 5)."""
        if self.core.state is not State.OPEN:
            return []
        return self.core.receive_audio(self.transport.flush())

    def error(self, error: ProtocolError) -> list[Message]:
        return self._tail() + self.core.error(error)

    def timed_out(self) -> list[Message]:
        return self._tail() + self.core.timed_out()

    def shutdown(self) -> list[Message]:
        return self._tail() + self.core.shutdown()

    def fail(self, what: str) -> list[Message]:
        return self.core.fail(what)

    def gone(self) -> None:
        return None  # nothing to tell: the session is simply dropped

    def drain(self) -> list[Message]:
        return self.core.drain()

    def done(self) -> list[Message]:
        return self.core.done(self.transport.seconds)

    def lag(self, seconds: float) -> list[Message]:
        return self.core.lag(seconds)

    def results(self, job: Job | None, events: list[Message]) -> list[tuple[bool, int]]:
        # By the event, not the job: a speculative job's result may become either.
        ends = {"final": "end", "partial": "audio_end"}
        return [
            (event["type"] == "final", round(event[ends[event["type"]]] * SAMPLE_RATE))
            for event in events
            if event["type"] in ends
        ]


class RealtimeCodec:
    """OpenAI's Realtime transcription protocol over a WebSocket: text events only, no idle timeout
    (a push-to-talk client is silent between turns; the WebSocket's pings tell a live client from a
    dead one), and at ``max_session_s`` of audio the session expires (an ``error``, then the drain)."""

    def __init__(self, core: RealtimeSession, decoding: DecodingOptions, max_session_s: float) -> None:
        self.core = core
        self._decoding = decoding
        self._max_samples = round(max_session_s * SAMPLE_RATE)
        self._max_session_s = max_session_s
        self._closing: tuple[int, str] | None = None
        self._failed = False

    @property
    def source(self) -> RealtimeSession:
        return self.core

    @property
    def timestamps(self) -> bool:
        return False

    @property
    def receiving(self) -> bool:
        return self._closing is None

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def idle_timeout_s(self) -> float | None:
        return None

    @property
    def position(self) -> int:
        return self.core.position

    @property
    def closing(self) -> tuple[int, str]:
        return self._closing or (CloseCode.GOING_AWAY, "shutdown")

    def decoding(self) -> DecodingOptions:
        return replace(self._decoding, language=self.core.language, context=self.core.context)

    def opened(self) -> list[Message]:
        return self.core.opened()

    async def receive(self, message: str | bytes) -> list[Message]:
        if isinstance(message, bytes):
            message = '{"type": "binary"}'  # the protocol has text events only: an unknown type
        events = self.core.receive(message)
        if self.core.position > self._max_samples and self._closing is None:
            self._closing = (CloseCode.NORMAL, "session_expired")
            limit = f"Your session hit the maximum duration of {self._max_session_s:g} seconds of audio."
            events += self.core.expire(limit)
        return events

    def error(self, error: ProtocolError) -> list[Message]:
        return []  # the transport refuses nothing: the core answers every event itself

    def timed_out(self) -> list[Message]:
        return []

    def shutdown(self) -> list[Message]:
        if self._closing is None:
            self._closing = (CloseCode.GOING_AWAY, "shutdown")
        return []

    def fail(self, what: str) -> list[Message]:
        if self._failed:
            return []
        self._failed = True
        self._closing = (CloseCode.INTERNAL_ERROR, "internal_error")
        return self.core.abort(what)

    def gone(self) -> None:
        self.core.close()

    def drain(self) -> list[Message]:
        return self.core.finish()  # the open utterance is committed; every item due is transcribed

    def done(self) -> list[Message]:
        return []

    def lag(self, seconds: float) -> list[Message]:
        return []

    def results(self, job: Job | None, events: list[Message]) -> list[tuple[bool, int]]:
        # Without a job: a transcript that was in before the audio that committed its item arrived.
        end = job.end if job is not None else self.core.position
        return [(True, end) for event in events if event["type"].endswith("input_audio_transcription.completed")]
