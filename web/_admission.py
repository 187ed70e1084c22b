"""Admission and readiness: the one place that decides whether a new session is taken.

``Admission`` counts the session slots taken (streaming sessions, realtime sessions, uploads being
transcribed), knows the open connections (their latest result latency is the server's lag; a
shutdown interrupts them) and says why a new session would be refused: ``stopping``, ``full`` or
``lagging``. Every admission and ``GET /readyz`` ask the same ``unavailable()``, so a load balancer
never sees "ready" where a session would be refused.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from asrlive.streaming import ProtocolError

from ._metrics import WINDOW_S

if TYPE_CHECKING:
    from ._connection import Connection
    from ._options import ServerOptions


class Admission:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self._admitted = 0
        self._connections: set[Connection] = set()
        self._stopping = False
        self._counter = 0

    @property
    def admitted(self) -> int:
        """Session slots taken now."""
        return self._admitted

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> list[Connection]:
        """The server is shutting down: nothing more is admitted; the connections open now."""
        self._stopping = True
        return list(self._connections)

    def unavailable(self) -> tuple[str, ProtocolError] | None:
        """Why a new session would be refused now (``stopping``, ``full`` or ``lagging``, and the
        refusal); None while one would be admitted."""
        options = self.options
        if self._stopping:
            return "stopping", ProtocolError("server_busy", "the server is shutting down")
        if self._admitted >= options.max_sessions:
            message = f"all {options.max_sessions} sessions are in use; try again later"
            return "full", ProtocolError("server_full", message)
        lag = self.worst_lag()
        if options.max_lag_s and lag > options.max_lag_s:
            message = f"the open sessions' results are {lag:.1f} s behind their audio; try again later"
            return "lagging", ProtocolError("server_busy", message)
        return None

    def admit(self) -> ProtocolError | None:
        """Take a session slot: None if taken (``release`` it later), else why not."""
        unavailable = self.unavailable()
        if unavailable is not None:
            return unavailable[1]
        self._admitted += 1
        return None

    def release(self) -> None:
        self._admitted -= 1

    def name(self) -> str:
        """A new session's name for the log and ``ready`` (s1, s2, ...)."""
        self._counter += 1
        return f"s{self._counter}"

    @contextlib.contextmanager
    def open(self, connection: Connection) -> Iterator[None]:
        """An admitted connection while it runs: its lag counts; its slot is released at the end."""
        self._connections.add(connection)
        try:
            yield
        finally:
            self._connections.discard(connection)
            self.release()

    def worst_lag(self) -> float:
        """The latest result latency of each open session, if recent; the worst of them."""
        now = time.monotonic()
        recent = [c.latency[0] for c in self._connections if now - c.latency[1] < WINDOW_S]
        return max(recent, default=0.0)
