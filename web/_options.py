"""The server's options and endpoint paths: read by the command line without loading the engine."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from asrlive.engine import DecodingOptions
from asrlive.streaming import SessionOptions

STREAM_PATH = "/v1/stream"
RTC_PATH = "/v1/rtc"


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
    drain_timeout_s: float = 60.0  # at a session's end, how long the engine may stall before finals are given up
    close_timeout_s: float = 10.0
    session: SessionOptions = field(default_factory=SessionOptions)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_batch", "max_frame_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("idle_timeout_s", "max_session_s", "drain_timeout_s", "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        self.tls_context()  # a missing or bad certificate is reported now, not at the first connection

    def tls_context(self) -> ssl.SSLContext | None:
        if self.certfile is None or self.keyfile is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS certificate {self.certfile} / key {self.keyfile}: {exc}") from None
        return context
