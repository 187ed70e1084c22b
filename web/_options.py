"""The server's options and endpoint paths: read by the command line without loading the engine."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from asrlive.engine import DecodingOptions
from asrlive.streaming import SessionOptions

STREAM_PATH = "/v1/stream"
RTC_PATH = "/v1/rtc"
REALTIME_PATH = "/v1/realtime"  # OpenAI's Realtime API (transcription sessions)
# The OpenAI SDK lets one realtime append carry 15 MiB of base64; the rest of an event is small.
REALTIME_MAX_MESSAGE_BYTES = 15 * 1024 * 1024 + 64 * 1024


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (see AsrServer.port)
    max_sessions: int = 16
    max_batch: int = 8  # computations (one per stream) in flight in the inference thread at once
    max_frame_bytes: int = 256 * 1024
    idle_timeout_s: float = 30.0
    max_session_s: float = 4 * 3600.0
    max_lag_s: float = 3.0  # refuse new sessions while an open one's results are this late; 0: never
    lag_warning_s: float = 2.0  # tell a client when its results are this late
    token: str | None = None
    certfile: str | None = None  # with keyfile: TLS (wss://, https://): browsers need it for a mic off localhost
    keyfile: str | None = None
    # Origins of pages that may open WebSocket sessions (e.g. "https://example.com"), besides the
    # server's own page; None: any. Clients that are not browsers send no Origin and are not affected.
    allowed_origins: tuple[str, ...] | None = None
    max_upload_bytes: int = 25 * 1024 * 1024  # a file for POST /v1/audio/transcriptions (OpenAI's limit)
    drain_timeout_s: float = 60.0  # at a session's end, how long the engine may stall before finals are given up
    close_timeout_s: float = 10.0
    # Deadlines for what a client owes (web/_http.py; docs/protocol.md, "Deadlines"): a request's head
    # (HTTP headers or the WebSocket upgrade), an upload's body, the next request on a kept-alive
    # connection; and the connections open at once, past which a new one is answered 503.
    handshake_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 1000
    # Messages waiting for a client that reads too slowly; past it superseded partials are dropped,
    # and a client whose finals alone exceed it is given up (its connection aborted).
    max_outbox_bytes: int = 1024 * 1024
    session: SessionOptions = field(default_factory=SessionOptions)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "max_batch",
            "max_frame_bytes",
            "max_upload_bytes",
            "max_outbox_bytes",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "idle_timeout_s",
            "max_session_s",
            "drain_timeout_s",
            "close_timeout_s",
            "handshake_timeout_s",
            "body_timeout_s",
            "keepalive_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        self.tls_context()  # a missing or bad certificate is reported now, not at the first connection
        if isinstance(self.allowed_origins, str):
            raise ValueError("allowed_origins: a tuple of origins, not one string")
        if self.allowed_origins is not None:
            object.__setattr__(self, "allowed_origins", tuple(normalize_origin(o) for o in self.allowed_origins))

    def tls_context(self) -> ssl.SSLContext | None:
        if self.certfile is None or self.keyfile is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS certificate {self.certfile} / key {self.keyfile}: {exc}") from None
        return context


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...] | None) -> bool:
    """Whether a WebSocket handshake's ``Origin`` may open a session: always without a list
    (``allowed`` None) or without an Origin (clients other than browsers send none); else when
    it is listed, or is the page's own origin (its host[:port] is the one the request went to)."""
    if allowed is None or origin is None:
        return True
    origin = origin.strip().lower()
    if origin in allowed:
        return True
    return bool(host) and urlsplit(origin).netloc == (host or "").strip().lower()


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it in the ``Origin`` header: ``scheme://host[:port]``, lower case."""
    text = origin.strip().lower().removesuffix("/")
    if not _is_origin(text):
        raise ValueError(f"allowed_origins: {origin!r} is no origin (scheme://host or scheme://host:port)")
    parts = urlsplit(text)
    if (parts.scheme, parts.port) in (("http", 80), ("https", 443)):  # browsers leave the default port out
        text = text.removesuffix(f":{parts.port}")
    return text


def _is_origin(text: str) -> bool:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (a port that is no number, or out of range, raises)
    except ValueError:
        return False
    only_host = parts.username is None and not (parts.path or "?" in text or "#" in text)
    return bool(parts.scheme and parts.hostname) and only_host
