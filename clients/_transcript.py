"""A transcript: lines of text with times, written as .txt, .srt, .vtt or .jsonl.

The live client keeps its finals in a ``Transcript`` and rewrites the file after each;
``asrlive transcribe`` appends each piece to an open file with a ``TranscriptWriter``. Both
write the same bytes for the same lines, and both cut a line's subtitle into readable cues
(``split_cues``): at most two lines of 42 columns and 7 seconds on screen, the usual limits.
A line with the aligner's word times (``Line.words``) is cut at them, each cue on screen while
its words are spoken, and its .vtt cues mark where each word starts (karaoke); the .jsonl keeps them.

Times are seconds from the start of the *stream* the client captured, not of one server session:
after a reconnect the client shifts the new session's times by where that session started.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from asrlive._words import Word, words_from_json, words_json

from ._cues import Span, atom_spans
from ._width import char_width, display_width

FORMATS = (".txt", ".srt", ".vtt", ".jsonl")


@dataclass(frozen=True)
class Line:
    start: float  # seconds from the start of the stream
    end: float
    text: str
    language: str | None
    token_ids: tuple[int, ...]
    words: tuple[Word, ...] | None = None  # the aligner's units with their times, when asked for and found

    @property
    def caption(self) -> str:
        """The text on one line: a blank line would end a subtitle cue."""
        return " ".join(self.text.split())

    @classmethod
    def from_final(cls, event: dict[str, Any]) -> Line:
        return cls(
            event["start"],
            event["end"],
            event["text"],
            event.get("language"),
            tuple(event["token_ids"]),
            words_from_json(event.get("words")),
        )


@dataclass(frozen=True)
class CueLimits:
    """What a reader can take in from one subtitle: the common broadcast and streaming limits."""

    line_columns: int = 42  # display columns: a CJK character takes two
    max_lines: int = 2
    max_seconds: float = 7.0

    def __post_init__(self) -> None:
        if self.line_columns < 2 or self.max_lines < 1 or self.max_seconds <= 0:
            raise ValueError(f"unusable cue limits {self}")


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    lines: tuple[str, ...]
    # Karaoke: (offset in "\n".join(lines), seconds) where a word starts, strictly inside the cue
    # and strictly increasing to the millisecond; only cues cut by word times have them.
    marks: tuple[tuple[int, float], ...] = ()


@dataclass
class Transcript:
    lines: list[Line] = field(default_factory=list)
    limits: CueLimits = CueLimits()

    def add(self, final: dict[str, Any]) -> Line:
        line = Line.from_final(final)
        self.lines.append(line)
        return line

    @property
    def spoken(self) -> list[Line]:
        """The lines with text (an utterance can be transcribed as nothing: noise, a cough)."""
        return [line for line in self.lines if line.caption]

    def render(self, suffix: str) -> str:
        out = io.StringIO()
        writer = TranscriptWriter(out, suffix, self.limits)
        for line in self.lines:
            writer.add(line)
        return out.getvalue()

    def write(self, path: str | Path) -> None:
        """Write by the file's suffix; the whole file at once, so a reader never sees half of it."""
        path = Path(path)
        write_whole(path, self.render(path.suffix.lower()))

    def txt(self) -> str:
        return self.render(".txt")

    def srt(self) -> str:
        return self.render(".srt")

    def vtt(self) -> str:
        return self.render(".vtt")

    def jsonl(self) -> str:
        return self.render(".jsonl")


def write_whole(path: Path, text: str) -> None:
    """Replace the file at ``path`` by ``text`` at once (a sibling ``.part`` renamed over it): a
    reader, or an interruption, never finds half of it."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


class TranscriptWriter:
    """Writes each line to ``out`` as it comes and flushes: whatever stops the process, every line
    written so far is whole in the file. The formats are all appendable (a .vtt's header first)."""

    def __init__(self, out: TextIO, suffix: str, limits: CueLimits = CueLimits()) -> None:
        if suffix not in FORMATS:
            raise ValueError(f"unknown transcript format {suffix!r}: use one of {', '.join(FORMATS)}")
        self._out = out
        self._suffix = suffix
        self._limits = limits
        self._cues = 0  # SubRip numbers its cues
        if suffix == ".vtt":
            out.write("WEBVTT\n\n")
            out.flush()

    def add(self, line: Line) -> None:
        if self._suffix == ".jsonl":
            record: dict[str, Any] = {
                "start": line.start,
                "end": line.end,
                "text": line.text,
                "language": line.language,
                "token_ids": list(line.token_ids),
            }
            if line.words is not None:
                record["words"] = words_json(line.words)
            self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif line.caption and self._suffix == ".txt":
            self._out.write(line.caption + "\n")
        elif line.caption:
            cues = split_cues(line.caption, line.start, line.end, self._limits, line.words)
            self._out.write("".join(self._cue(cue) for cue in cues))
        self._out.flush()

    def _cue(self, cue: Cue) -> str:
        if self._suffix == ".vtt":
            return f"{timestamp(cue.start, '.')} --> {timestamp(cue.end, '.')}\n{_vtt_text(cue)}\n\n"
        self._cues += 1
        return (
            f"{self._cues}\n{timestamp(cue.start, ',')} --> {timestamp(cue.end, ',')}\n" + "\n".join(cue.lines) + "\n\n"
        )


def _vtt_text(cue: Cue) -> str:
    """The cue's text, escaped, with a cue timestamp tag (``<00:01:02.345>``) at each of its marks."""
    text = "\n".join(cue.lines)
    pieces, done = [], 0
    for offset, seconds in cue.marks:
        pieces.append(f"{_vtt_escape(text[done:offset])}<{timestamp(seconds, '.')}>")
        done = offset
    return "".join(pieces) + _vtt_escape(text[done:])


def _vtt_escape(text: str) -> str:
    """WebVTT cue text is markup: a bare < starts a tag, & an entity, and --> may not appear."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def timestamp(seconds: float, separator: str) -> str:
    """``HH:MM:SS,mmm`` (SubRip) or ``HH:MM:SS.mmm`` (WebVTT)."""
    millis = _millis(seconds)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _millis(seconds: float) -> int:
    """The time as the files write it: whole milliseconds."""
    return round(seconds * 1000)


# --- cutting a line into cues ----------------------------------------------------------------

# Where a cue may end, by preference: after a sentence, after a clause, anywhere between words.
# The costs are in squared columns, the unit in which cue lengths are balanced (see _best_cues).
_CUE_COST = 10_000  # fewer cues first: each one is another flash to read
_BREAK_COST = {"sentence": 0, "clause": 400, "word": 800}
_LINE_BREAK_COST = {"sentence": 0, "clause": 20, "word": 40}
_SENTENCE_END = set(".?!…。！？‼⁇⁈⁉")
_CLAUSE_END = set(",;:—–，、；：")
# No line may start with these (closing marks, small kana, iteration marks) or end with the openers:
# the Chinese and Japanese rules of line breaking (kinsoku), which also keep "word," together.
_NO_BREAK_BEFORE = set(
    "!),.:;?]}¢°’”‰′″℃、。〉》」』】〕〗〙〛〜〞ゝゞヽヾー々〻ぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶ"
    "・！％），．：；？］｝～｡｣､･ｰ…‥"
)
_NO_BREAK_AFTER = set("([{‘“〈《「『【〔〖〘〚〝（［｛｢")


@dataclass(frozen=True)
class _Atom:
    """The smallest piece a cue or line break keeps together: a word, or one CJK character."""

    text: str
    spaced: bool  # a space separates it from the atom before
    width: int  # display columns


def split_cues(
    text: str, start: float, end: float, limits: CueLimits = CueLimits(), words: Sequence[Word] | None = None
) -> list[Cue]:
    """Cut a line spoken from ``start`` to ``end`` into cues a reader can follow: each at most
    ``limits.max_lines`` lines of ``limits.line_columns`` columns and ``limits.max_seconds`` long.

    Cuts fall between words (in Chinese and Japanese, between characters), preferably after a
    sentence or a clause, into cues of even length. The text is kept whole: the cues' lines joined
    by the spaces the cuts took are the line.

    With ``words`` (the aligner's units of the text, with their times) each cue runs from its first
    word's start to its last word's end, and carries karaoke marks where its other words start;
    without them, or when they do not match the text, the line's time is shared out in proportion
    to the text, and a single word that would stay on screen longer than the limit is shown for the
    limit.
    """
    atoms = _atoms(" ".join(text.split()), limits.line_columns)
    if not atoms:
        return []
    weights = [0]
    for atom in atoms:
        # Cues are balanced by columns (a CJK character, a syllable, counts two), and time shared by
        # them; a zero-width atom still counts one, so the weights never sum to zero.
        weights.append(weights[-1] + max(atom.width, 1))
    spans = None if words is None else atom_spans([atom.text for atom in atoms], words)
    if spans is None:
        return _shared_cues(atoms, weights, start, end, limits)
    return _timed_cues(atoms, weights, spans, limits)


def _shared_cues(atoms: list[_Atom], weights: list[int], start: float, end: float, limits: CueLimits) -> list[Cue]:
    """The cues with the line's time shared out by columns."""
    duration = max(end - start, 0.0)
    seconds_per_weight = duration / weights[-1]
    cuts = _best_cues(atoms, weights, lambda i, j: (weights[j] - weights[i]) * seconds_per_weight, limits)
    cues = []
    for first, last in zip(cuts, cuts[1:], strict=False):
        cue_start = start + duration * weights[first] / weights[-1]
        cue_end = end if last == len(atoms) else start + duration * weights[last] / weights[-1]
        cue_end = min(cue_end, cue_start + limits.max_seconds)
        cues.append(Cue(cue_start, cue_end, tuple(map(_join, _wrap(atoms[first:last], limits)))))
    return cues


def _timed_cues(atoms: list[_Atom], weights: list[int], spans: list[Span], limits: CueLimits) -> list[Cue]:
    """The cues with their words' times: each from its first word's start to its last word's end.
    The spans never run back, so neither do the cues, and none overlaps the next."""
    cuts = _best_cues(atoms, weights, lambda i, j: spans[j - 1].end - spans[i].start, limits)
    cues = []
    for first, last in zip(cuts, cuts[1:], strict=False):
        rows = _wrap(atoms[first:last], limits)
        cue_start = spans[first].start
        cue_end = max(spans[last - 1].end, cue_start)  # a cue of punctuation alone has no time
        marks = _marks(rows, [span.start for span in spans[first:last]], cue_start, cue_end)
        cues.append(Cue(cue_start, cue_end, tuple(map(_join, rows)), marks))
    return cues


def _marks(rows: list[list[_Atom]], starts: list[float], start: float, end: float) -> tuple[tuple[int, float], ...]:
    """Karaoke marks: before each atom but the first, at its start, where that is strictly later
    than the mark before (or the cue's start) and earlier than the cue's end, to the millisecond."""
    marks: list[tuple[int, float]] = []
    offset, index, latest = 0, 0, _millis(start)
    for row in rows:
        for n, atom in enumerate(row):
            offset += 1 if n and atom.spaced else 0
            if index and latest < _millis(starts[index]) < _millis(end):
                marks.append((offset, starts[index]))
                latest = _millis(starts[index])
            offset += len(atom.text)
            index += 1
        offset += 1  # the line break
    return tuple(marks)


def _atoms(text: str, columns: int) -> list[_Atom]:
    atoms: list[_Atom] = []
    for word in text.split(" "):
        for n, piece in enumerate(_pieces(word, columns)):
            atoms.append(_Atom(piece, spaced=n == 0 and bool(atoms), width=display_width(piece)))
    return atoms


def _pieces(word: str, columns: int) -> list[str]:
    """A word cut where line breaking allows it without a space: around CJK characters, and
    anywhere in a word wider than a whole line (a URL), which cannot be kept on one."""
    pieces: list[str] = []
    current = ""
    for char in word:
        if current and (_may_break(current[-1], char) or display_width(current + char) > columns):
            pieces.append(current)
            current = ""
        current += char
    if current:
        pieces.append(current)
    return pieces


def _may_break(before: str, after: str) -> bool:
    if char_width(after) == 0 or before == "\u200d":  # a mark belongs to its letter; a joiner joins
        return False
    if after in _NO_BREAK_BEFORE or before in _NO_BREAK_AFTER:
        return False
    return char_width(before) == 2 or char_width(after) == 2


def _ending(atom: _Atom) -> str:
    last = atom.text.rstrip("\"'”’」』)）]")[-1:]
    if last in _SENTENCE_END:
        return "sentence"
    return "clause" if last in _CLAUSE_END else "word"


def _best_cues(
    atoms: list[_Atom], weights: list[int], seconds: Callable[[int, int], float], limits: CueLimits
) -> list[int]:
    """The cut points (atom indices, 0 and len(atoms) included) of the cheapest valid cutting.

    Dynamic programming over cut points: a cue of atoms[i:j] is valid when it fits the lines and,
    unless it is a single atom, the time limit (it is on screen ``seconds(i, j)``); it costs
    _CUE_COST, its weight squared (so equal cues are cheapest) and the cost of the break that ends
    it. A cue only gets less valid as it grows, so each start is extended until it fails:
    O(atoms x atoms per cue)."""
    n = len(atoms)
    best = [0.0] + [math.inf] * n
    back = [0] * (n + 1)
    for i in range(n):
        lines, column = 1, 0
        for j in range(i + 1, n + 1):
            atom = atoms[j - 1]
            added = atom.width + (1 if atom.spaced else 0)
            if j == i + 1:
                column = atom.width
            elif column + added > limits.line_columns:  # greedy filling needs the fewest lines
                lines, column = lines + 1, atom.width
            else:
                column += added
            weight = weights[j] - weights[i]
            if j > i + 1 and (lines > limits.max_lines or seconds(i, j) > limits.max_seconds + 1e-9):
                break
            cost = best[i] + _CUE_COST + weight * weight + (0 if j == n else _BREAK_COST[_ending(atom)])
            if cost < best[j]:
                best[j], back[j] = cost, i
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(back[cuts[-1]])
    return cuts[::-1]


def _wrap(atoms: list[_Atom], limits: CueLimits) -> list[list[_Atom]]:
    """The cue's atoms on as few lines as it needs, balanced in width, broken after punctuation
    where that costs little."""
    # Prefix sums: widths[k] of atoms[:k], spaces[k] of the spaced atoms among them.
    widths, spaces = [0], [0]
    for atom in atoms:
        widths.append(widths[-1] + atom.width)
        spaces.append(spaces[-1] + atom.spaced)
    lines = _fewest_lines(atoms, limits.line_columns)
    n = len(atoms)
    # best[r][j]: the cost of atoms[:j] on r lines: the squared widths (equal lines are cheapest)
    # and a small cost for each break that does not follow punctuation.
    best = [[math.inf] * (n + 1) for _ in range(lines + 1)]
    back = [[0] * (n + 1) for _ in range(lines + 1)]
    best[0][0] = 0.0
    for r in range(1, lines + 1):
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):
                # atoms[i:j] on one line: their widths and the spaces between them (none before the first)
                width = widths[j] - widths[i] + spaces[j] - spaces[i + 1]
                if width > limits.line_columns and i < j - 1:
                    break
                if best[r - 1][i] == math.inf:
                    continue
                cost = best[r - 1][i] + width * width + (0 if j == n else _LINE_BREAK_COST[_ending(atoms[j - 1])])
                if cost < best[r][j]:
                    best[r][j], back[r][j] = cost, i
    cuts = [n]
    for r in range(lines, 0, -1):
        cuts.append(back[r][cuts[-1]])
    cuts.reverse()
    return [atoms[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def _fewest_lines(atoms: list[_Atom], columns: int) -> int:
    lines, column = 1, atoms[0].width
    for atom in atoms[1:]:
        added = atom.width + (1 if atom.spaced else 0)
        if column + added > columns:
            lines, column = lines + 1, atom.width
        else:
            column += added
    return lines


def _join(atoms: list[_Atom]) -> str:
    return "".join((" " if atom.spaced and n else "") + atom.text for n, atom in enumerate(atoms))
