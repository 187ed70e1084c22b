"""``asrlive bench serve``: concurrent real-time sessions against in-process servers, batched or not.

The same random-weight network of the true shapes, the same simulated text as ``bench stream``
(3 tokens per second of speech, 5 tokens of every update taken back), the same real speech; for
each batch limit and each number of sessions a fresh server on a loopback port and the load
generator's clients streaming in real time. One run, so the rows compare like for like.

Final latency is measured by the clients: from sending the audio at the final's ``end`` to
receiving the final. Its p50 is also given for the finals ending in the first and in the second
half of the sessions, so a latency that grows over a run (a queue that never drains) shows; a
final that never came is counted as lost (``clients/_loadtest.py`` says exactly when).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from asrlive._audio import SAMPLE_RATE
from asrlive._bench_align import bench_aligner
from asrlive._bench_stream import PROMPT, ScriptedTranscriber, Setup, bench_model, dump_json, looped_speech
from asrlive.clients._loadtest import LoadReport, run_load
from asrlive.web import AsrServer, ServerOptions

if TYPE_CHECKING:
    from pathlib import Path

    from asrlive.engine import AsrModel, DecodingOptions
    from asrlive.engine._aligner import Aligner


@dataclass(frozen=True)
class ServeBenchOptions:
    size: str
    dtype: torch.dtype
    device: str | None
    quantize: str | None
    counts: tuple[int, ...]  # sessions per run
    batches: tuple[int, ...]  # max streams per batch
    duration: float  # seconds of audio per session
    interval_ms: int
    audio: Path | None
    json: bool
    plain_weights: bool = False  # F.linear over the weights as loaded (--plain-weights)
    timestamps: bool = False  # each row also with word timestamps on every final


@dataclass(frozen=True)
class ServeRow:
    """One run: a batch limit, a number of sessions, what the clients and the server's metrics saw."""

    max_batch: int
    sessions: int
    report: LoadReport
    timestamps: bool = False

    def figures(self) -> dict[str, Any]:
        report = self.report
        first, second = report.final_latency_halves()
        return {
            "batch": self.max_batch,
            "sessions": self.sessions,
            "timestamps": self.timestamps,
            "rtf": report.real_time_factor,
            "partial_p50_s": _percentile(report.partial_latencies, 50),
            "partial_p95_s": _percentile(report.partial_latencies, 95),
            "partials_per_s": len(report.partial_latencies) / max(report.audio_seconds, 1e-9),
            "final_p50_s": _percentile(report.final_latencies, 50),
            "final_p95_s": _percentile(report.final_latencies, 95),
            "final_p50_first_half_s": _percentile(first, 50),
            "final_p50_second_half_s": _percentile(second, 50),
            "finals": report.finals,
            "lost_finals": report.lost_finals,
            "errors": len(report.errors),
            "error_codes": sorted(set(report.errors)),
        }

    def line(self) -> str:
        f = self.figures()

        def s(key: str) -> str:
            value = f[key]
            return "n/a" if value is None else f"{value:.2f}"

        times = "words" if self.timestamps else "-"
        return (
            f"{self.max_batch:>5} {self.sessions:>8} {times:>5} {s('rtf'):>5} {s('partial_p50_s'):>11} "
            f"{s('partial_p95_s'):>6} "
            f"{s('partials_per_s'):>10} {s('final_p50_s'):>9} {s('final_p95_s'):>6} "
            f"{s('final_p50_first_half_s'):>8} {s('final_p50_second_half_s'):>8} {f['lost_finals']:>5} {f['errors']:>6}"
        )


HEADER = (
    f"{'batch':>5} {'sessions':>8} {'times':>5} {'RTF':>5} {'partial p50':>11} {'p95':>6} {'partials/s':>10} "
    f"{'final p50':>9} {'p95':>6} {'1st half':>8} {'2nd half':>8} {'lost':>5} {'errors':>6}"
)


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _transcriber(model: AsrModel, decoding: DecodingOptions) -> ScriptedTranscriber:
    # The bench fixes the tokens decoded: a random-weight model's loops are part of the script, not cut.
    return ScriptedTranscriber(model, replace(decoding, cut_loops=False), PROMPT)


async def _measure(
    model: AsrModel,
    aligner: Aligner | None,
    max_batch: int,
    sessions: int,
    clips: list[np.ndarray],
    interval_ms: int,
) -> LoadReport:
    options = ServerOptions(port=0, max_batch=max_batch, max_sessions=sessions, max_lag_s=0)
    async with AsrServer(model, options, _transcriber, aligner) as server:
        return await run_load(
            server.url, clips, sessions, partial_interval_ms=interval_ms, timestamps=aligner is not None
        )


def _clips(duration: float, sessions: int, audio_path: Path | None) -> list[np.ndarray]:
    """One clip per session, each starting elsewhere in the looped speech."""
    speech = looped_speech(duration * 2, audio_path)
    size = int(duration * SAMPLE_RATE)
    return [np.roll(speech, -i * 7 * SAMPLE_RATE)[:size] for i in range(sessions)]


def bench_serve(options: ServeBenchOptions) -> None:
    print(f"building a random-weight {options.size} network ...", file=sys.stderr, flush=True)
    model = bench_model(options.size, options.dtype, options.device, options.quantize, options.plain_weights)
    aligner = None
    if options.timestamps:
        print("building a random-weight Qwen3-ForcedAligner-0.6B ...", file=sys.stderr, flush=True)
        aligner = bench_aligner(options.dtype, options.device, options.quantize, options.plain_weights)
    clips = _clips(options.duration, max(options.counts), options.audio)
    rows = []
    for max_batch in options.batches:
        for sessions in options.counts:
            for with_words in (None, aligner) if aligner is not None else (None,):
                words = " with word timestamps" if with_words is not None else ""
                print(f"batch {max_batch}, {sessions} sessions{words} ...", file=sys.stderr, flush=True)
                report = asyncio.run(_measure(model, with_words, max_batch, sessions, clips, options.interval_ms))
                rows.append(ServeRow(max_batch, sessions, report, with_words is not None))
                print(rows[-1].line(), file=sys.stderr, flush=True)
    setup = Setup.of(options.size, model)
    if options.json:
        print(dump_json(_json(setup, options, rows)), flush=True)
    else:
        print("\n".join(_table(setup, options, rows)), flush=True)


def _table(setup: Setup, options: ServeBenchOptions, rows: Sequence[ServeRow]) -> list[str]:
    return [
        f"model: {setup.line()}",
        f"each session: {options.duration:g} s of real speech in real time, a partial every {options.interval_ms} ms "
        "of audio (coalesced when the engine is behind); simulated text as in `asrlive bench stream`",
        "RTF: engine busy time / wall time (1.0 = saturated); latencies measured by the clients, in seconds; "
        "final latency: from sending the audio at the final's end to receiving it",
        "1st half, 2nd half: final latency p50 of the finals ending in the first, the second half of the sessions; "
        "lost: finals that never came; times: words, every final carries word timestamps (Qwen3-ForcedAligner-0.6B "
        "shapes, random weights)",
        "",
        HEADER,
        *(row.line() for row in rows),
    ]


def _json(setup: Setup, options: ServeBenchOptions, rows: Sequence[ServeRow]) -> dict[str, Any]:
    return {
        "model": setup.fields(),
        "duration_s": options.duration,
        "partial_interval_ms": options.interval_ms,
        "rows": [row.figures() for row in rows],
    }
