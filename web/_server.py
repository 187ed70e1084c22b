"""The asyncio server: the WebSocket and WebRTC endpoints, the page, health and metrics, admission,
graceful shutdown."""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from collections.abc import Callable
from importlib import resources
from urllib.parse import urlsplit

from aiortc import RTCPeerConnection
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from asrlive import __version__
from asrlive.engine import LANGUAGES, AsrModel
from asrlive.engine._aligner import Aligner
from asrlive.streaming import PROTOCOL_VERSION, ProtocolError

from ._connection import Connection, authorized
from ._metrics import WINDOW_S, Metrics
from ._options import RTC_PATH, STREAM_PATH, ServerOptions
from ._rtc import RtcTransport
from ._scheduler import Scheduler, TranscriberFactory
from ._transport import Transport, WebSocketTransport

log = logging.getLogger("asrlive.server")

LANGUAGES_PATH = "/v1/languages"
PAGE_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # modules and the AudioWorklet need a JavaScript type
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


class AsrServer:
    """``async with AsrServer(model, options) as server: await server.wait_closed()``."""

    protocol_version = PROTOCOL_VERSION

    def __init__(
        self,
        model: AsrModel,
        options: ServerOptions,
        make_transcriber: TranscriberFactory | None = None,
        aligner: Aligner | None = None,
    ) -> None:
        self.model = model
        self.model_name = model.info.name
        self.aligner = aligner  # word timestamps for the sessions that ask for them
        # What a client's context may not spell (its control tokens): the tokenizer's, read once.
        self.control_tokens = tuple(model.tokenizer.get_added_vocab())
        self.options = options
        self.metrics = Metrics()
        self.scheduler = Scheduler(model, self.metrics, options.max_batch, make_transcriber, aligner)
        self._connections: set[Connection] = set()
        self.peers: set[RTCPeerConnection] = set()  # WebRTC peer connections now open
        self._page = load_page()
        self._admitted = 0
        self._counter = 0
        self._server: Server | None = None
        self._stopping = False
        self.metrics.sessions.set_function(lambda: self._admitted)
        self.metrics.lag.set_function(self.worst_lag)
        self.metrics.peer_connections.set_function(lambda: len(self.peers))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.scheduler.start()
        self._server = await serve(
            self._handle,
            self.options.host,
            self.options.port,
            process_request=self._process_request,
            # Frames a little over the limit get a protocol error (and their session's finals);
            # far larger ones are cut off by the WebSocket layer with close code 1009.
            max_size=4 * self.options.max_frame_bytes,
            compression=None,
            close_timeout=self.options.close_timeout_s,
            ssl=self.options.tls_context(),
        )
        log.debug("listening on %s", self.url)  # the command line prints it, once

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"{self._origin('ws')}{STREAM_PATH}"

    @property
    def page_url(self) -> str:
        return f"{self._origin('http')}/"

    def _origin(self, scheme: str) -> str:
        host = self.options.host if ":" not in self.options.host else f"[{self.options.host}]"
        secure = "s" if self.options.certfile else ""
        return f"{scheme}{secure}://{host}:{self.port}"

    async def shutdown(self) -> None:
        """Stop accepting; every open session gets its finals, ``done`` and close code 1001; then stop."""
        if self._stopping:
            return
        self._stopping = True
        assert self._server is not None
        log.info("shutting down: finishing %d open sessions", len(self._connections))
        self._server.close(close_connections=False)
        for connection in list(self._connections):
            connection.interrupt("shutdown")
        await self._server.wait_closed()
        await self.scheduler.stop()
        log.info("stopped")

    async def wait_closed(self) -> None:
        assert self._server is not None
        await self._server.wait_closed()

    async def __aenter__(self) -> AsrServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- connections -----------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self._counter += 1
        connection = Connection(self, self._transport(ws), self._counter)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:
            log.exception("%s: connection failed", connection.id)
        finally:
            self._connections.discard(connection)
            if connection.admitted:
                self._admitted -= 1

    def _transport(self, ws: ServerConnection) -> Transport:
        path = urlsplit(ws.request.path).path if ws.request else STREAM_PATH
        if path == RTC_PATH:
            return RtcTransport(ws, self.options, self.peers)
        return WebSocketTransport(ws, self.options)

    def admit(self, connection: Connection) -> ProtocolError | None:
        """None to admit the connection's session, else why it is refused."""
        options = self.options
        if not authorized(connection.ws, options.token):
            return ProtocolError("unauthorized", "a valid token is required (Authorization: Bearer, or ?token=)")
        if self._stopping:
            return ProtocolError("server_busy", "the server is shutting down")
        if self._admitted >= options.max_sessions:
            return ProtocolError("server_full", f"all {options.max_sessions} sessions are in use; try again later")
        if options.max_lag_s and self.worst_lag() > options.max_lag_s:
            return ProtocolError(
                "server_busy",
                f"the open sessions' results are {self.worst_lag():.1f} s behind their audio; try again later",
            )
        self._admitted += 1
        connection.admitted = True
        return None

    def worst_lag(self) -> float:
        """The latest result latency of each open session, if recent; the worst of them."""
        now = time.monotonic()
        recent = [c.latency[0] for c in self._connections if now - c.latency[1] < WINDOW_S]
        return max(recent, default=0.0)

    # -- plain HTTP --------------------------------------------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in (STREAM_PATH, RTC_PATH):
            return None
        if path in self._page:
            return file_response(*self._page[path])
        if path == LANGUAGES_PATH:
            body = {"languages": LANGUAGES, "timestamps": self.aligner is not None}
            return _response(ws, http.HTTPStatus.OK, json.dumps(body) + "\n", "application/json")
        if path == "/healthz":
            status = http.HTTPStatus.SERVICE_UNAVAILABLE if self._stopping else http.HTTPStatus.OK
            body = {
                "status": "stopping" if self._stopping else "ok",
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "model": self.model_name,
                "aligner": self.aligner.info.name if self.aligner is not None else None,
                "sessions": self._admitted,
                "max_sessions": self.options.max_sessions,
            }
            return _response(ws, status, json.dumps(body) + "\n", "application/json")
        if path == "/metrics":
            return _response(ws, http.HTTPStatus.OK, self.metrics.exposition().decode(), CONTENT_TYPE_LATEST)
        return _response(
            ws,
            http.HTTPStatus.NOT_FOUND,
            f"not found; the WebSocket endpoints are {STREAM_PATH} and {RTC_PATH}, the page is /\n",
        )


def _response(ws: ServerConnection, status: http.HTTPStatus, body: str, content_type: str | None = None) -> Response:
    response = ws.respond(status, body)  # text/plain; charset=utf-8
    if content_type is not None:
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = content_type
    return response


def load_page() -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, content type) for every file of the page (``web/static/``, shipped in the
    package; no build step); ``/`` is the index. Only these exact paths are served."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("asrlive.web").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in PAGE_TYPES:
            files["/" + entry.name] = (entry.read_bytes(), PAGE_TYPES[suffix])
    files["/"] = files["/index.html"]
    return files


def file_response(body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            # The files change with the server's version; a cached old script would speak an old protocol.
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    return Response(http.HTTPStatus.OK, http.HTTPStatus.OK.phrase, headers, body)


async def run_server(server: AsrServer, ready: Callable[[AsrServer], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    if ready is not None:
        ready(server)
    await stop.wait()
    await server.shutdown()
