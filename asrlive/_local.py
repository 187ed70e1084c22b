"""Streaming a file through the engine in this process: a Session paired with a StreamTranscriber.

As fast as possible, a partial is computed after every ``partial_interval_ms`` of audio. In real
time, audio arrives at wall-clock pace while the engine works, and each partial covers the newest
audio when the engine becomes free: on a slow machine partials coalesce, finals never do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from asrlive._audio import SAMPLE_RATE
from asrlive.engine import StreamTranscriber
from asrlive.engine._aligner import Aligner
from asrlive.streaming import Event, Session

CHUNK = SAMPLE_RATE // 10  # 100 ms, what a microphone callback typically delivers


def stream_audio(
    session: Session,
    transcriber: StreamTranscriber,
    audio: np.ndarray,
    realtime: bool = False,
    aligner: Aligner | None = None,
) -> Iterator[Event]:
    """Feed ``audio`` (16 kHz mono float32) to ``session``; yield every event in order.

    With an ``aligner``, every final carries its words.
    """
    chunks = [audio[i : i + CHUNK] for i in range(0, audio.size, CHUNK)]
    started = time.monotonic()
    fed = 0
    while fed < len(chunks):
        due = fed + 1
        if realtime:
            # Everything that has "arrived" by now, at least the next chunk (waiting for it).
            time.sleep(max(0.0, started + fed * CHUNK / SAMPLE_RATE - time.monotonic()))
            elapsed = time.monotonic() - started
            due = min(len(chunks), max(due, int(elapsed * SAMPLE_RATE / CHUNK) + 1))
        for chunk in chunks[fed:due]:
            yield from session.feed(chunk)
        fed = due
        yield from run_jobs(session, transcriber, aligner)
    yield from session.finish()
    yield from run_jobs(session, transcriber, aligner)


def run_jobs(session: Session, transcriber: StreamTranscriber, aligner: Aligner | None = None) -> Iterator[Event]:
    """Run the session's pending work: every queued final, then at most one partial on the newest audio."""
    while (job := session.next_job()) is not None:
        hypothesis = transcriber.transcribe(job.segment, job.audio, job.final)
        alignment = None
        if aligner is not None and (job.final or job.speculative):
            alignment = aligner.alignment(job.audio, hypothesis.text, hypothesis.language)
        yield from session.complete(job, hypothesis.token_ids, hypothesis.text, hypothesis.language, alignment)
        if not job.final:
            return  # newer audio arrives before the next partial
