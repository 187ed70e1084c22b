"""A word (or CJK character) of a transcript with its time, as the forced aligner gives it.

Torch-free: the engine makes them, the streaming session carries them on finals, the clients
write them into subtitles. Times are seconds, to the millisecond (the aligner's resolution is
80 ms, its times are whole milliseconds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Word:
    text: str  # the aligner's unit: a word cleaned to letters, digits and apostrophes, or one CJK character
    start: float  # seconds
    end: float

    def shifted(self, seconds: float) -> Word:
        """The same word on a clock that starts ``seconds`` earlier (a piece's start in its file or stream)."""
        return Word(self.text, round(self.start + seconds, 3), round(self.end + seconds, 3))

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Word:
        return cls(str(record["text"]), float(record["start"]), float(record["end"]))


def words_json(words: Sequence[Word] | None) -> list[dict[str, Any]] | None:
    return None if words is None else [word.to_json() for word in words]


def words_from_json(records: Iterable[dict[str, Any]] | None) -> tuple[Word, ...] | None:
    return None if records is None else tuple(Word.from_json(record) for record in records)


@dataclass(frozen=True)
class Alignment:
    """The words of one transcript piece, or why there are none (an unsupported language, too many
    words for the audio): the piece itself stands either way."""

    words: tuple[Word, ...] | None
    error: str | None = None

    def shifted(self, seconds: float) -> Alignment:
        if self.words is None:
            return self
        return Alignment(tuple(word.shifted(seconds) for word in self.words), self.error)

    def to_json(self) -> dict[str, Any]:
        """The fields a final carries: ``words`` (null when they failed) and then ``words_error``."""
        record: dict[str, Any] = {"words": words_json(self.words)}
        if self.error is not None:
            record["words_error"] = self.error
        return record
