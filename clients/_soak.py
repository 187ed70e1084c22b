"""The soak: a server's memory over a long run of normal sessions and storms of aborted ones.

For the whole duration, ``sessions`` clients stream real speech in real time one session after
another, each finished normally (``finish``, its finals, ``done``): the load generator's clients
(``_loadtest.py``). Every ``storm_every_s`` seconds a storm of ``storm`` more sessions starts at
once; each streams speech in real time and, half a second after the server announces an
utterance (``speech_started``) that has not stopped, drops its TCP connection: no close frame, no
``finish``, the utterance cut in the middle, as when a client's network or process dies.

Every ``report_every_s`` seconds the server's resident memory (``process_resident_memory_bytes``)
and open sessions (``asrlive_open_sessions``) are read from its /metrics, with the sessions done
and aborted so far. The last sample is taken after every session has ended and the server's open
sessions are back to 0 (or ``SETTLE_S`` have passed). A server that leaks per session grows
without bound; one that does not levels off: its growth over the second half of the run is small.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asrlive._audio import SAMPLE_RATE

from ._client import SessionRefused, Stream, connect
from ._loadtest import FRAME, ClientRecord, read_metrics, run_client, sample, send_frames

MiB = 2**20
RSS = "process_resident_memory_bytes"
OPEN_SESSIONS = "asrlive_open_sessions"
ABORT_AFTER_S = 0.5  # into an announced utterance: the server is decoding it when the connection drops
NO_SPEECH_S = 5.0  # after a storm session's audio, how long to wait for an utterance before giving up
REFUSED_PAUSE_S = 1.0  # a refused normal session is tried again after this long
SETTLE_S = 30.0  # at the end, how long to wait for the server's open sessions to return to 0


@dataclass(frozen=True)
class SoakOptions:
    duration_s: float
    sessions: int  # normal sessions streaming at any time
    storm: int = 0  # sessions per storm, each aborted mid-utterance; 0: no storms
    storm_every_s: float = 60.0
    report_every_s: float = 60.0
    stagger_s: float = 0.25  # between the starts of the normal sessions' clients
    token: str | None = None
    partial_interval_ms: int | None = None


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    rss_bytes: float | None  # None: the server's /metrics has no process_resident_memory_bytes
    open_sessions: float | None
    done: int  # normal sessions that ended with `done`, so far
    aborted: int  # sessions dropped mid-utterance, so far
    errors: int

    @property
    def rss_mib(self) -> float | None:
        return None if self.rss_bytes is None else self.rss_bytes / MiB

    def line(self) -> str:
        rss = "n/a" if self.rss_mib is None else f"{self.rss_mib:.1f}"
        sessions = "n/a" if self.open_sessions is None else f"{self.open_sessions:.0f}"
        return f"{self.elapsed_s:>7.0f}s {rss:>9} {sessions:>5} {self.done:>6} {self.aborted:>8} {self.errors:>6}"

    def figures(self) -> dict[str, Any]:
        return {
            "elapsed_s": round(self.elapsed_s, 3),
            "rss_mib": self.rss_mib,
            "open_sessions": self.open_sessions,
            "done": self.done,
            "aborted": self.aborted,
            "errors": self.errors,
        }


HEADER = f"{'elapsed':>8} {'RSS MiB':>9} {'open':>5} {'done':>6} {'aborted':>8} {'errors':>6}"


@dataclass
class Tally:
    """What the clients saw so far."""

    done: int = 0
    aborted: int = 0
    lost_finals: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, record: ClientRecord) -> None:
        self.done += record.done
        self.lost_finals += record.lost_finals
        self.errors += record.errors


@dataclass(frozen=True)
class SoakReport:
    options: SoakOptions
    samples: tuple[Sample, ...]
    lost_finals: int
    errors: tuple[str, ...]

    def rss_mib(self) -> list[float]:
        return [rss for _, rss in self._rss()]

    def second_half_growth_mib(self) -> float | None:
        """The last sample's RSS less the first one's at or after half the run, or None without figures."""
        measured = self._rss()
        if not measured:
            return None
        end, last = measured[-1]
        return last - next(rss for elapsed, rss in measured if elapsed >= end / 2)

    def _rss(self) -> list[tuple[float, float]]:
        """(elapsed seconds, RSS MiB) of the samples that have it."""
        return [(s.elapsed_s, s.rss_mib) for s in self.samples if s.rss_mib is not None]

    def lines(self) -> list[str]:
        last = self.samples[-1]
        options = self.options
        storms = (
            f"storms of {options.storm} sessions aborted mid-utterance every {options.storm_every_s:g} s "
            f"({last.aborted} aborted)"
            if options.storm
            else "no disconnect storms"
        )
        rss = self.rss_mib()
        growth = self.second_half_growth_mib()
        memory = (
            f"RSS: first {rss[0]:.1f} MiB, last {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB; "
            f"over the second half {growth:+.1f} MiB"
            if rss and growth is not None
            else f"RSS: n/a (the server's /metrics has no {RSS})"
        )
        open_sessions = "n/a" if last.open_sessions is None else f"{last.open_sessions:.0f}"
        errors = f"errors: {len(self.errors)}" + (f" ({', '.join(sorted(set(self.errors)))})" if self.errors else "")
        return [
            f"soak: {last.elapsed_s:.0f} s, {options.sessions} sessions at a time ({last.done} done), {storms}",
            memory,
            f"open sessions at the end: {open_sessions}",
            f"lost finals: {self.lost_finals}",
            errors,
        ]

    def figures(self) -> dict[str, Any]:
        rss = self.rss_mib()
        last = self.samples[-1]
        return {
            "duration_s": self.options.duration_s,
            "sessions": self.options.sessions,
            "storm": self.options.storm,
            "storm_every_s": self.options.storm_every_s,
            "samples": [s.figures() for s in self.samples],
            "rss_first_mib": rss[0] if rss else None,
            "rss_last_mib": rss[-1] if rss else None,
            "rss_max_mib": max(rss) if rss else None,
            "rss_second_half_growth_mib": self.second_half_growth_mib(),
            "open_sessions_at_end": last.open_sessions,
            "done": last.done,
            "aborted": last.aborted,
            "lost_finals": self.lost_finals,
            "errors": len(self.errors),
            "error_codes": sorted(set(self.errors)),
        }


async def run_soak(
    url: str, clips: Sequence[np.ndarray], options: SoakOptions, on_sample: Callable[[Sample], None]
) -> SoakReport:
    """Soak the server at ``url`` (its /metrics must be readable); ``on_sample`` gets each sample as it is taken."""
    tally = Tally()
    started = time.monotonic()
    deadline = started + options.duration_s
    samples = [await _sample(url, started, tally)]
    on_sample(samples[-1])
    clients = [_normal_sessions(url, clips, options, index, deadline, tally) for index in range(options.sessions)]
    work = asyncio.gather(*clients, _storms(url, clips, options, deadline, tally))
    while not work.done():
        next_at = started + len(samples) * options.report_every_s
        await asyncio.wait([work], timeout=max(0.0, next_at - time.monotonic()))
        if not work.done():
            samples.append(await _sample(url, started, tally))
            on_sample(samples[-1])
    await work
    samples.append(await _settled_sample(url, started, tally))
    on_sample(samples[-1])
    return SoakReport(options, tuple(samples), tally.lost_finals, tuple(tally.errors))


async def _sample(url: str, started: float, tally: Tally) -> Sample:
    text = await asyncio.to_thread(read_metrics, url)
    rss = None if text is None else sample(text, RSS)
    open_sessions = None if text is None else sample(text, OPEN_SESSIONS)
    return Sample(time.monotonic() - started, rss, open_sessions, tally.done, tally.aborted, len(tally.errors))


async def _settled_sample(url: str, started: float, tally: Tally) -> Sample:
    """A sample once the server has no open session, or after ``SETTLE_S``, whichever comes first."""
    give_up = time.monotonic() + SETTLE_S
    while True:
        taken = await _sample(url, started, tally)
        if taken.open_sessions in (0, None) or time.monotonic() > give_up:
            return taken
        await asyncio.sleep(0.2)


async def _normal_sessions(
    url: str, clips: Sequence[np.ndarray], options: SoakOptions, index: int, deadline: float, tally: Tally
) -> None:
    """One client: sessions one after another, each a clip streamed and finished, until ``deadline``."""
    await asyncio.sleep(index * options.stagger_s)
    turn = index
    while time.monotonic() < deadline:
        record = ClientRecord()
        await run_client(url, clips[turn % len(clips)], record, 0.0, options.token, options.partial_interval_ms, False)
        tally.add(record)
        turn += options.sessions
        if not record.accepted:
            await asyncio.sleep(REFUSED_PAUSE_S)


async def _storms(url: str, clips: Sequence[np.ndarray], options: SoakOptions, deadline: float, tally: Tally) -> None:
    """A storm every ``storm_every_s`` seconds (or as soon as the previous one is over) until ``deadline``."""
    if not options.storm:
        return
    storm = 0
    next_at = time.monotonic()
    while next_at < deadline:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        first = storm * options.storm
        chosen = [clips[(first + i) % len(clips)] for i in range(options.storm)]
        await asyncio.gather(*(_aborted_session(url, audio, options, tally) for audio in chosen))
        storm += 1
        next_at += options.storm_every_s


async def _aborted_session(url: str, audio: np.ndarray, options: SoakOptions, tally: Tally) -> None:
    try:
        async with connect(url, token=options.token, partial_interval_ms=options.partial_interval_ms) as stream:
            if await abort_mid_utterance(stream, audio):
                tally.aborted += 1
            else:
                tally.errors.append("no_utterance_to_abort")
    except SessionRefused as refused:
        tally.errors.append(refused.code)
    except (OSError, TimeoutError) as exc:
        tally.errors.append(type(exc).__name__)


async def abort_mid_utterance(stream: Stream, audio: np.ndarray) -> bool:
    """Stream ``audio`` in real time and drop the TCP connection ``ABORT_AFTER_S`` into an utterance.

    The utterance is one the server announced (``speech_started``) and has not ended
    (``speech_stopped``). False, with the session left as it is, if there was none: the server
    ended the session, or none began by ``NO_SPEECH_S`` after the audio.
    """
    sender = asyncio.create_task(send_frames(stream, audio, np.zeros(-(-audio.size // FRAME))))
    events = aiter(stream)
    give_up = time.monotonic() + audio.size / SAMPLE_RATE + NO_SPEECH_S
    speaking_since: float | None = None
    try:
        while True:
            until = give_up if speaking_since is None else speaking_since + ABORT_AFTER_S
            try:
                event = await asyncio.wait_for(anext(events), max(0.0, until - time.monotonic()))
            except asyncio.TimeoutError:
                break
            except StopAsyncIteration:
                return False
            if event["type"] == "speech_started":
                speaking_since = time.monotonic()
            elif event["type"] == "speech_stopped":
                speaking_since = None
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    if speaking_since is None:
        return False
    stream.ws.transport.abort()
    return True
