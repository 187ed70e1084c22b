"""What a streaming session tells its client: typed events and their JSON form.

Times on the wire are seconds from the start of the stream; they are sample counts divided by
16 000, so ``round(t * 16000)`` gives the exact sample back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from asrlive._words import Alignment

SAMPLE_RATE = 16_000

CloseReason = Literal["silence", "max_length", "finish"]


def seconds(samples: int) -> float:
    return samples / SAMPLE_RATE


@dataclass(frozen=True)
class SpeechStarted:
    segment: int
    start: int  # samples

    def to_json(self) -> dict[str, Any]:
        return {"type": "speech_started", "segment": self.segment, "start": seconds(self.start)}


@dataclass(frozen=True)
class SpeechStopped:
    segment: int
    end: int  # samples
    reason: CloseReason

    def to_json(self) -> dict[str, Any]:
        return {"type": "speech_stopped", "segment": self.segment, "end": seconds(self.end), "reason": self.reason}


@dataclass(frozen=True)
class Partial:
    segment: int
    text: str
    stable: str  # the prefix the last two hypotheses agree on: show it solid
    unstable: str  # the rest: may still change, show it grey
    start: int  # samples
    audio_end: int  # samples: the hypothesis covers [start, audio_end)
    token_ids: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "partial",
            "segment": self.segment,
            "text": self.text,
            "stable": self.stable,
            "unstable": self.unstable,
            "start": seconds(self.start),
            "audio_end": seconds(self.audio_end),
            "token_ids": list(self.token_ids),
        }


@dataclass(frozen=True)
class Final:
    segment: int
    text: str
    language: str | None
    start: int  # samples
    end: int  # samples
    token_ids: tuple[int, ...]
    alignment: Alignment | None = None  # word times in the stream's clock; None: not asked for

    def to_json(self) -> dict[str, Any]:
        record = {
            "type": "final",
            "segment": self.segment,
            "text": self.text,
            "language": self.language,
            "start": seconds(self.start),
            "end": seconds(self.end),
            "token_ids": list(self.token_ids),
        }
        if self.alignment is not None:
            record |= self.alignment.to_json()
        return record


Event = SpeechStarted | SpeechStopped | Partial | Final
