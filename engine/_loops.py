"""The rule that cuts a decode that loops: a pure function of the generated token ids.

A model sometimes repeats an n-gram until its token budget runs out; at ~3 tokens per second of
speech against a budget of 12, a looping piece costs four times the work of speech. Decoding
stops at the first token where the generated ids end with a pattern of period ``p`` (1 to
``MAX_PERIOD`` tokens) repeated over the last ``span(p) = max(MIN_REPEATS * p, MIN_TOKENS)``
ids, the shortest such period first. What is kept is everything before that repeating stretch
plus one copy of its pattern: of the ids decoded up to there, the last ``span(p) - p`` are
dropped. The decode then ends as it would at an eos.

The thresholds are far from speech: "no no no", a word said five times, laughter, a number's
zeros are a few to a dozen tokens; the cut needs 40 tokens of repetition at the least (20
repeats of a two-token pattern, the number at which the reference's text collapse of
``_prompt`` already treats a run as a loop), and five whole repeats of a longer pattern.

Every path (offline pieces, streaming updates, hence the server) stops and cuts by this module,
on the same ids, so that a streamed result stays token-identical to offline transcription.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_PERIOD = 16  # tokens in the longest pattern that counts (a sentence's length)
MIN_REPEATS = 5  # whole copies of the pattern
MIN_TOKENS = 40  # ids the repetition covers at the least, whatever its period


def span(period: int) -> int:
    """How many trailing ids must repeat with this period for the decode to be cut."""
    return max(MIN_REPEATS * period, MIN_TOKENS)


@dataclass(frozen=True)
class Loop:
    """``tokens[:end]`` ends in ``span(period)`` ids repeating with ``period``."""

    end: int
    period: int

    @property
    def kept(self) -> int:
        """Ids kept: those before the repeating stretch and one copy of its pattern."""
        return self.end - span(self.period) + self.period


_SPANS = tuple((period, span(period)) for period in range(1, MAX_PERIOD + 1))


def loop_at(tokens: Sequence[int], end: int) -> Loop | None:
    """The loop ``tokens[:end]`` ends in, of the shortest period; None if it ends in none."""
    newest = tokens[end - 1]
    for period, size in _SPANS:
        start = end - size
        if start < 0:
            return None  # spans only grow with the period
        # The first comparison rejects almost every period of ordinary text without a slice.
        if newest == tokens[end - 1 - period] and tokens[start + period : end] == tokens[start : end - period]:
            return Loop(end, period)
    return None


def first_loop(tokens: Sequence[int]) -> Loop | None:
    """The loop at the first point of ``tokens`` where a decode would have been cut; None if nowhere."""
    for end in range(MIN_TOKENS, len(tokens) + 1):
        loop = loop_at(tokens, end)
        if loop is not None:
            return loop
    return None


def without_loop(tokens: list[int]) -> list[int]:
    """What a decode keeps of ``tokens``: all of them, or the part before the first loop and one copy of it."""
    loop = first_loop(tokens)
    return tokens if loop is None else tokens[: loop.kept]
