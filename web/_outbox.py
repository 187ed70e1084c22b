"""The messages a connection has yet to send to its client, bounded in bytes.

A client that reads slower than the server writes (a congested link, a stalled tab, a bug) makes
the messages wait here once the socket's buffers are full. Past ``max_bytes`` the messages that
newer ones have made pointless are dropped (a partial followed by a newer partial or the final,
a ``lag`` followed by a newer one); what is left is the session's record (finals, VAD events,
errors, ``done``) and is never dropped: if it alone is over the bound, ``put`` says so and the
connection gives the client up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple

# A queued message of each kind here is pointless once a newer message of one of the listed kinds
# is queued after it (a partial: a newer partial or the final; a lag: a newer lag).
_SUPERSEDED_BY = {"partial": ("partial", "final"), "lag": ("lag",)}


class _Message(NamedTuple):
    kind: str
    text: str


class Outbox:
    """A FIFO of JSON texts: ``put`` from anywhere on the loop, ``get``/``task_done`` by one sender,
    ``join`` waits until everything put so far has been handled. ``end()`` queues the end (``None``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.dropped = 0  # superseded messages never sent
        self._messages: deque[_Message | None] = deque()
        self._bytes = 0
        self._unfinished = 0  # put, not yet task_done (dropped ones count as done)
        self._available = asyncio.Event()
        self._all_done = asyncio.Event()
        self._all_done.set()

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, kind: str, text: str) -> bool:
        """Queue a message; False if the queue is still over ``max_bytes`` after dropping what
        newer messages superseded (the message is queued all the same)."""
        self._append(_Message(kind, text))
        self._bytes += len(text)
        if self._bytes > self.max_bytes:
            self._drop_superseded()
        return self._bytes <= self.max_bytes

    def end(self) -> None:
        self._append(None)

    async def get(self) -> str | None:
        while not self._messages:
            self._available.clear()
            await self._available.wait()
        message = self._messages.popleft()
        if message is None:
            return None
        self._bytes -= len(message.text)
        return message.text

    def task_done(self) -> None:
        self._unfinished -= 1
        if not self._unfinished:
            self._all_done.set()

    async def join(self) -> None:
        await self._all_done.wait()

    def _append(self, message: _Message | None) -> None:
        self._messages.append(message)
        self._unfinished += 1
        self._all_done.clear()
        self._available.set()

    def _drop_superseded(self) -> None:
        """From the newest message back: a partial or lag with a newer one of its family is dropped."""
        seen: set[str] = set()
        kept: deque[_Message | None] = deque()
        for message in reversed(self._messages):
            if message is not None:
                family = _SUPERSEDED_BY.get(message.kind, ())
                if any(kind in seen for kind in family):
                    self._bytes -= len(message.text)
                    self.dropped += 1
                    self.task_done()
                    continue
                seen.add(message.kind)
            kept.appendleft(message)
        self._messages = kept
