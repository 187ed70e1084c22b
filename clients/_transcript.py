"""A live transcript: the finals of a stream, kept in order and written as .txt, .srt, .vtt or .jsonl.

Times are seconds from the start of the *stream* the client captured, not of one server session:
after a reconnect the client shifts the new session's times by where that session started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = (".txt", ".srt", ".vtt", ".jsonl")


@dataclass(frozen=True)
class Line:
    start: float  # seconds from the start of the stream
    end: float
    text: str
    language: str | None
    token_ids: tuple[int, ...]

    @property
    def caption(self) -> str:
        """The text on one line: a blank line would end a subtitle cue."""
        return " ".join(self.text.split())

    @classmethod
    def from_final(cls, event: dict[str, Any]) -> Line:
        return cls(event["start"], event["end"], event["text"], event.get("language"), tuple(event["token_ids"]))


@dataclass
class Transcript:
    lines: list[Line] = field(default_factory=list)

    def add(self, final: dict[str, Any]) -> Line:
        line = Line.from_final(final)
        self.lines.append(line)
        return line

    @property
    def spoken(self) -> list[Line]:
        """The lines with text (an utterance can be transcribed as nothing: noise, a cough)."""
        return [line for line in self.lines if line.caption]

    def render(self, suffix: str) -> str:
        renderers = {".txt": self.txt, ".srt": self.srt, ".vtt": self.vtt, ".jsonl": self.jsonl}
        if suffix not in renderers:
            raise ValueError(f"unknown transcript format {suffix!r}: use one of {', '.join(FORMATS)}")
        return renderers[suffix]()

    def write(self, path: str | Path) -> None:
        """Write by the file's suffix; the whole file at once, so a reader never sees half of it."""
        path = Path(path)
        text = self.render(path.suffix.lower())
        partial = path.with_name(path.name + ".part")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)

    def txt(self) -> str:
        return "".join(f"{line.caption}\n" for line in self.spoken)

    def srt(self) -> str:
        return "\n".join(f"{n}\n{_cue(line, ',')}" for n, line in enumerate(self.spoken, start=1))

    def vtt(self) -> str:
        return "\n".join(["WEBVTT\n", *(_cue(line, ".") for line in self.spoken)])

    def jsonl(self) -> str:
        records = (
            {
                "start": line.start,
                "end": line.end,
                "text": line.text,
                "language": line.language,
                "token_ids": list(line.token_ids),
            }
            for line in self.lines
        )
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _cue(line: Line, separator: str) -> str:
    return f"{timestamp(line.start, separator)} --> {timestamp(line.end, separator)}\n{line.caption}\n"


def timestamp(seconds: float, separator: str) -> str:
    """``HH:MM:SS,mmm`` (SubRip) or ``HH:MM:SS.mmm`` (WebVTT)."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"
