"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
WINDOW_S = 10.0  # the real-time factor and load are measured over this much recent wall-clock time


class Window:
    """Amounts added over time, summed over the last ``WINDOW_S`` seconds."""

    def __init__(self) -> None:
        self._items: deque[tuple[float, float]] = deque()

    def add(self, amount: float, now: float | None = None) -> None:
        self._items.append((time.monotonic() if now is None else now, amount))

    def total(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._items and self._items[0][0] < now - WINDOW_S:
            self._items.popleft()
        return sum(amount for _, amount in self._items)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import ProcessCollector

        self.registry = registry = CollectorRegistry()
        # process_resident_memory_bytes, CPU seconds, open fds...: what `asrlive loadtest --soak` watches.
        ProcessCollector(registry=registry)
        self.sessions = Gauge("asrlive_open_sessions", "Open streaming sessions", registry=registry)
        self.sessions_total = Counter("asrlive_sessions", "Sessions started", registry=registry)
        self.refused = Counter("asrlive_sessions_refused", "Sessions refused", ["code"], registry=registry)
        self.errors = Counter("asrlive_errors", "Errors reported to clients", ["code"], registry=registry)
        self.slow_clients = Counter(
            "asrlive_slow_clients", "Sessions aborted because the client did not read its messages", registry=registry
        )
        self.audio_seconds = Counter("asrlive_audio_seconds", "Audio received, in seconds", registry=registry)
        self.inference_seconds = Counter(
            "asrlive_inference_seconds", "Wall-clock time the inference thread was busy", registry=registry
        )
        self.real_time_factor = Gauge(
            "asrlive_real_time_factor",
            f"Inference time / audio time received, over the last {WINDOW_S:.0f} s (all sessions)",
            registry=registry,
        )
        self.partial_latency = Histogram(
            "asrlive_partial_latency_seconds",
            "Arrival of the last audio a partial covers -> partial sent",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.final_latency = Histogram(
            "asrlive_final_latency_seconds",
            "Arrival of an utterance's last audio -> final sent",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "asrlive_batch_streams",
            "Computations (streams) in one inference round",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=registry,
        )
        self.lag = Gauge("asrlive_lag_seconds", "Worst result latency among open sessions", registry=registry)
        self.peer_connections = Gauge("asrlive_peer_connections", "WebRTC peer connections now open", registry=registry)
        self.connections_closed = Counter(
            "asrlive_connections_closed",
            "Connections closed by the HTTP layer: a deadline passed (handshake_timeout, body_timeout, "
            "keepalive_timeout), a bad request, or refused over max_connections",
            ["reason"],
            registry=registry,
        )
        self._busy = Window()
        self._audio = Window()
        self.real_time_factor.set_function(self.recent_real_time_factor)

    def connections_closed_by(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()

    def audio(self, seconds: float) -> None:
        self.audio_seconds.inc(seconds)
        self._audio.add(seconds)

    def busy(self, seconds: float, streams: int) -> None:
        self.inference_seconds.inc(seconds)
        self._busy.add(seconds)
        self.batch_size.observe(streams)

    def recent_real_time_factor(self) -> float:
        audio = self._audio.total()
        return self._busy.total() / audio if audio > 0 else 0.0

    def recent_load(self) -> float:
        """Fraction of the recent wall-clock time the inference thread was busy."""
        return self._busy.total() / WINDOW_S

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
