"""``asrlive bench serve``: concurrent real-time sessions against in-process servers, batched or not.

The same random-weight network of the true shapes, the same simulated text as ``bench stream``
(3 tokens per second of speech, 5 tokens of every update taken back), the same real speech; for
each batch limit and each number of sessions a fresh server on a loopback port and the load
generator's clients streaming in real time. One run, so the rows compare like for like.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from asrlive._audio import SAMPLE_RATE
from asrlive._bench_stream import PROMPT, ScriptedTranscriber, bench_model, looped_speech
from asrlive.clients._loadtest import LoadReport, run_load
from asrlive.web import AsrServer, ServerOptions

if TYPE_CHECKING:
    from pathlib import Path

    from asrlive.engine import AsrModel, DecodingOptions


def _transcriber(model: AsrModel, decoding: DecodingOptions) -> ScriptedTranscriber:
    return ScriptedTranscriber(model, decoding, PROMPT)


async def _measure(
    model: AsrModel, max_batch: int, sessions: int, clips: list[np.ndarray], interval_ms: int
) -> LoadReport:
    options = ServerOptions(port=0, max_batch=max_batch, max_sessions=sessions, max_lag_s=0)
    async with AsrServer(model, options, _transcriber) as server:
        return await run_load(server.url, clips, sessions, partial_interval_ms=interval_ms)


def _clips(duration: float, sessions: int, audio_path: Path | None) -> list[np.ndarray]:
    """One clip per session, each starting elsewhere in the looped speech."""
    speech = looped_speech(duration * 2, audio_path)
    size = int(duration * SAMPLE_RATE)
    return [np.roll(speech, -i * 7 * SAMPLE_RATE)[:size] for i in range(sessions)]


def bench_serve(
    size: str,
    dtype: torch.dtype,
    counts: Sequence[int],
    batches: Sequence[int],
    duration: float,
    interval_ms: int,
    audio_path: Path | None,
) -> None:
    print(f"building a random-weight {size} network ...", file=sys.stderr, flush=True)
    model = bench_model(size, dtype)
    packed = max(batches) >= 4 and model.pack_weights()
    clips = _clips(duration, max(counts), audio_path)
    header = (
        f"{'batch':>5} {'sessions':>8} {'RTF':>5} {'partial p50':>11} {'p95':>6} {'partials/s':>10} "
        f"{'final p50':>9} {'p95':>6} {'errors':>6}"
    )
    lines = [
        f"model: Qwen3-ASR {size} shapes, random weights, {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, MKL-packed weights for batches: {'yes' if packed else 'no'}",
        f"each session: {duration:g} s of real speech in real time, a partial every {interval_ms} ms of audio "
        "(coalesced when the engine is behind); simulated text as in `asrlive bench stream`",
        "RTF: engine busy time / wall time (1.0 = saturated); latencies measured by the clients",
        "",
        header,
    ]
    for max_batch in batches:
        for sessions in counts:
            print(f"batch {max_batch}, {sessions} sessions ...", file=sys.stderr, flush=True)
            report = asyncio.run(_measure(model, max_batch, sessions, clips, interval_ms))
            lines.append(_row(max_batch, sessions, report))
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines), flush=True)


def _row(max_batch: int, sessions: int, report: LoadReport) -> str:
    def p(values: tuple[float, ...], q: float) -> str:
        return f"{np.percentile(values, q):.2f}" if values else "n/a"

    rate = len(report.partial_latencies) / max(report.audio_seconds, 1e-9)
    rtf = report.real_time_factor or float("nan")
    return (
        f"{max_batch:>5} {sessions:>8} {rtf:>5.2f} {p(report.partial_latencies, 50):>11} "
        f"{p(report.partial_latencies, 95):>6} {rate:>10.2f} {p(report.final_latencies, 50):>9} "
        f"{p(report.final_latencies, 95):>6} {len(report.errors):>6}"
    )
