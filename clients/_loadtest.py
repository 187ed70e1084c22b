"""The load generator: N concurrent clients streaming real speech in real time to a server.

Every client sends 100 ms frames at wall-clock pace and notes when each frame left. Latencies
are measured on the client: a partial's latency is the time from sending the last audio it
covers (``audio_end``) to receiving it; a final's, from sending the utterance's last audio
(``end``) to receiving it, which includes the silence the server waits for to end an utterance.
Event times are sample-exact, so "sending the audio at t" is sending the frame that holds the
sample just before t. Final latencies are also split by where the final's ``end`` falls in its
session (first or second half of the audio), so latency that grows over a run shows.

A final is lost when an utterance the server announced (``speech_started``/``speech_stopped``)
has no ``final`` by the end of its session, or when an accepted session does not end with
``done`` (whatever it still owed is lost: counted once).
The real-time factor comes from the server's /metrics: inference-thread busy time over the wall
time of the test, i.e. the share of real time the engine needed to serve all the streams; at
1.0 it is saturated and partials start to coalesce.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import numpy.typing as npt

from asrlive._audio import SAMPLE_RATE

from ._client import Event, SessionRefused, Stream, connect

FRAME = SAMPLE_RATE // 10


@dataclass
class ClientRecord:
    partial_latencies: list[float] = field(default_factory=list)
    final_latencies: list[float] = field(default_factory=list)
    final_positions: list[float] = field(default_factory=list)  # each final's end / the session's audio
    errors: list[str] = field(default_factory=list)
    finals: int = 0
    audio_seconds: float = 0.0
    accepted: bool = False  # the server answered ready
    done: bool = False  # the session ended with `done`
    unfinished: set[int] = field(default_factory=set)  # segments announced, final not received

    @property
    def lost_finals(self) -> int:
        if not self.accepted:
            return 0
        return max(len(self.unfinished), 0 if self.done else 1)


@dataclass(frozen=True)
class LoadReport:
    sessions: int
    wall_seconds: float
    audio_seconds: float
    partial_latencies: tuple[float, ...]
    final_latencies: tuple[float, ...]
    final_positions: tuple[float, ...]  # for each final latency: its end as a fraction of its session's audio
    finals: int
    lost_finals: int
    errors: tuple[str, ...]
    busy_seconds: float | None  # from the server's /metrics, if reachable

    @property
    def real_time_factor(self) -> float | None:
        return None if self.busy_seconds is None else self.busy_seconds / self.wall_seconds

    def final_latency_halves(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Final latencies of the finals ending in the first half of their session, and in the second."""
        pairs = list(zip(self.final_positions, self.final_latencies, strict=True))
        return tuple(x for at, x in pairs if at <= 0.5), tuple(x for at, x in pairs if at > 0.5)

    def lines(self) -> list[str]:
        rtf = "n/a (no /metrics)" if self.real_time_factor is None else f"{self.real_time_factor:.2f}"
        per_second = len(self.partial_latencies) / max(self.audio_seconds, 1e-9)
        first, second = self.final_latency_halves()
        return [
            f"sessions: {self.sessions}, {self.audio_seconds:.0f} s of audio in {self.wall_seconds:.0f} s",
            f"partial latency: p50 {_p(self.partial_latencies, 50)} p95 {_p(self.partial_latencies, 95)} "
            f"({len(self.partial_latencies)} partials, {per_second:.2f} per second of audio)",
            f"final latency (end of speech -> final): p50 {_p(self.final_latencies, 50)} "
            f"p95 {_p(self.final_latencies, 95)} ({self.finals} finals)",
            f"real-time factor (engine busy / wall time): {rtf}",
            f"errors: {len(self.errors)}" + (f" ({', '.join(sorted(set(self.errors)))})" if self.errors else ""),
            f"final latency p50 by the final's end: first half of the sessions {_p(first, 50)}, "
            f"second half {_p(second, 50)}",
            f"lost finals: {self.lost_finals}",
        ]


def _p(values: Sequence[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f} s" if len(values) else "n/a"


async def run_load(
    url: str,
    clips: list[np.ndarray],
    sessions: int,
    *,
    stagger_s: float = 0.25,
    token: str | None = None,
    partial_interval_ms: int | None = None,
    timestamps: bool = False,
) -> LoadReport:
    """``sessions`` clients, the i-th streaming ``clips[i % len(clips)]`` (16 kHz mono) from ``i * stagger_s``."""
    busy_before = await asyncio.to_thread(inference_seconds, url)
    started = time.monotonic()
    records = [ClientRecord() for _ in range(sessions)]
    clients = [
        run_client(url, clips[i % len(clips)], records[i], i * stagger_s, token, partial_interval_ms, timestamps)
        for i in range(sessions)
    ]
    await asyncio.gather(*clients)
    wall = time.monotonic() - started
    busy_after = await asyncio.to_thread(inference_seconds, url)
    busy = None if busy_before is None or busy_after is None else busy_after - busy_before
    return LoadReport(
        sessions=sessions,
        wall_seconds=wall,
        audio_seconds=sum(r.audio_seconds for r in records),
        partial_latencies=tuple(x for r in records for x in r.partial_latencies),
        final_latencies=tuple(x for r in records for x in r.final_latencies),
        final_positions=tuple(x for r in records for x in r.final_positions),
        finals=sum(r.finals for r in records),
        lost_finals=sum(r.lost_finals for r in records),
        errors=tuple(e for r in records for e in r.errors),
        busy_seconds=busy,
    )


async def run_client(
    url: str,
    audio: np.ndarray,
    record: ClientRecord,
    delay: float,
    token: str | None,
    interval: int | None,
    timestamps: bool,
) -> None:
    """One session: ``audio`` streamed in real time from ``delay`` seconds on, then finished; noted in ``record``."""
    await asyncio.sleep(delay)
    sent_at: npt.NDArray[np.float64] = np.full(-(-audio.size // FRAME), np.inf)  # when frame i left
    try:
        async with connect(url, token=token, partial_interval_ms=interval, timestamps=timestamps) as stream:
            record.accepted = True
            sender = asyncio.create_task(_send_realtime(stream, audio, sent_at))
            async for event in stream:
                note_event(record, event, time.monotonic(), sent_at, audio.size / SAMPLE_RATE)
            await sender
            if stream.close_code != 1000:
                record.errors.append(f"close {stream.close_code}")
            record.audio_seconds = audio.size / SAMPLE_RATE
    except SessionRefused as refused:
        record.errors.append(refused.code)
    except (OSError, TimeoutError) as exc:
        record.errors.append(type(exc).__name__)


def note_event(
    record: ClientRecord, event: Event, now: float, sent_at: npt.NDArray[np.float64], seconds: float
) -> None:
    kind = event["type"]
    if kind == "partial":
        record.partial_latencies.append(now - sent_time(sent_at, event["audio_end"]))
    elif kind in ("speech_started", "speech_stopped"):
        record.unfinished.add(event["segment"])
    elif kind == "final":
        record.final_latencies.append(now - sent_time(sent_at, event["end"]))
        record.final_positions.append(event["end"] / seconds)
        record.unfinished.discard(event["segment"])
        record.finals += 1
    elif kind == "error":
        record.errors.append(event["code"])
    elif kind == "done":  # every utterance the server heard should have had its final
        record.done = True
        record.errors += ["missing_final"] * max(event["segments"] - record.finals, 0)


def sent_time(sent_at: npt.NDArray[np.float64], seconds: float) -> float:
    """When the audio up to ``seconds`` had been sent: the time the frame holding its last sample left.

    Event times are sample-exact (``round(t * 16000)`` samples), so the sample count is rounded,
    not ceiled: a float just above a frame boundary must not name the next frame.
    """
    last_sample = max(round(seconds * SAMPLE_RATE) - 1, 0)
    at: float = sent_at[min(last_sample // FRAME, sent_at.size - 1)]  # numpy's stubs type an element as Any
    return at


async def _send_realtime(stream: Stream, audio: np.ndarray, sent_at: npt.NDArray[np.float64]) -> None:
    await send_frames(stream, audio, sent_at)
    await stream.finish()


async def send_frames(stream: Stream, audio: np.ndarray, sent_at: npt.NDArray[np.float64]) -> None:
    """``audio`` in 100 ms frames at wall-clock pace, noting when frame i left in ``sent_at[i]``."""
    start = time.monotonic()
    for index in range(sent_at.size):
        await asyncio.sleep(max(0.0, start + index * FRAME / SAMPLE_RATE - time.monotonic()))
        await stream.send_audio(audio[index * FRAME : (index + 1) * FRAME])
        sent_at[index] = time.monotonic()


def metrics_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "/metrics", "", ""))


def inference_seconds(url: str) -> float | None:
    """The server's asrlive_inference_seconds_total, or None if /metrics cannot be read."""
    return metric(url, "asrlive_inference_seconds_total")


def metric(url: str, name: str) -> float | None:
    """One unlabelled sample of the server's /metrics, or None if it cannot be read."""
    text = read_metrics(url)
    return None if text is None else sample(text, name)


def read_metrics(url: str) -> str | None:
    """The server's /metrics exposition, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(metrics_url(url), timeout=10) as response:
            text: str = response.read().decode()
    except OSError:
        return None
    return text


def sample(exposition: str, name: str) -> float | None:
    """One unlabelled sample of a Prometheus exposition, or None if it has none of that name."""
    for line in exposition.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None
