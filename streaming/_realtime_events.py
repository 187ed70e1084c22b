"""The server events of a Realtime transcription session, as JSON objects with the SDK's field names
(``openai.types.realtime``, GA; ``openai.types.beta.realtime`` where beta differs).

Every event gets a unique ``event_id`` (``event_`` + the session's random tag + a counter); items get
``item_`` ids from the same counter.
"""

from __future__ import annotations

import secrets
from typing import Any

from ._realtime_config import RealtimeError

TRANSCRIPTION = "conversation.item.input_audio_transcription"


class EventWriter:
    def __init__(self, beta: bool) -> None:
        self.beta = beta
        self._tag = secrets.token_hex(5)
        self._counter = 0

    def _next(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._tag}{self._counter:06x}"

    def item_id(self) -> str:
        return self._next("item")

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": self._next("event"), **fields}

    def error(self, problem: RealtimeError, event_id: str | None) -> dict[str, Any]:
        """``error``; ``event_id``: the client's, of the event refused (None if it had none)."""
        fields = {"code": problem.code, "message": problem.message, "param": problem.param, "event_id": event_id}
        return self.event("error", error={"type": problem.kind, **fields})

    def committed(self, item_id: str, previous: str | None) -> list[dict[str, Any]]:
        """A commit: ``input_audio_buffer.committed``, then the user message item it makes (GA
        ``conversation.item.added`` and ``.done`` at once: a user item is complete as committed; beta
        ``conversation.item.created``). Its transcript comes in the transcription events."""
        committed = self.event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        kinds = ["conversation.item.created"] if self.beta else ["conversation.item.added", "conversation.item.done"]
        return [committed, *(self.event(kind, item=_user_item(item_id), previous_item_id=previous) for kind in kinds)]

    def transcript(self, item_id: str, text: str, seconds: float, language_code: str | None) -> list[dict[str, Any]]:
        """The one delta (the whole text: the deltas add up to the transcript; none if it is empty),
        then ``completed``; usage is the item's duration, ``languages`` (GA) the detected language."""
        events = [self.event(f"{TRANSCRIPTION}.delta", item_id=item_id, content_index=0, delta=text)] if text else []
        usage = {"type": "duration", "seconds": seconds}
        completed = self.event(
            f"{TRANSCRIPTION}.completed", item_id=item_id, content_index=0, transcript=text, usage=usage
        )
        if language_code and not self.beta:
            completed["languages"] = [{"code": language_code}]
        return [*events, completed]

    def failed(self, item_id: str, message: str) -> dict[str, Any]:
        error = {"type": "server_error", "code": "transcription_failed", "message": message, "param": None}
        return self.event(f"{TRANSCRIPTION}.failed", item_id=item_id, content_index=0, error=error)


def _user_item(item_id: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_audio", "transcript": None}],
    }
