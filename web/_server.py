"""The asyncio server: the WebSocket and WebRTC endpoints, the page, health and metrics, admission,
graceful shutdown.

HTTP and WebSocket go through one ASGI application (Starlette, ``AsrServer.app``) served by uvicorn
on sockets the server binds itself; the WebSocket layer is websockets' sans-I/O protocol inside
uvicorn (web/_websocket.py). uvicorn runs without its signal handlers: ``run_server`` has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from importlib import resources
from urllib.parse import urlsplit

import uvicorn
from aiortc import RTCPeerConnection
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed

from asrlive import __version__
from asrlive.engine import LANGUAGES, AsrModel
from asrlive.engine._aligner import Aligner
from asrlive.streaming import PROTOCOL_VERSION, ProtocolError

from ._connection import Connection, Ending, authorized, bearer
from ._metrics import WINDOW_S, Metrics
from ._openai import models, transcriptions
from ._options import RTC_PATH, STREAM_PATH, ServerOptions
from ._realtime import MAX_MESSAGE_BYTES, REALTIME_PATH, RealtimeConnection, serve_realtime
from ._rtc import RtcTransport
from ._scheduler import Scheduler, TranscriberFactory
from ._transport import Transport, WebSocketTransport
from ._websocket import ServerWebSocket, websocket_protocol

log = logging.getLogger("asrlive.server")

LANGUAGES_PATH = "/v1/languages"
PAGE_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # modules and the AudioWorklet need a JavaScript type
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
NOT_FOUND = f"not found; the WebSocket endpoints are {STREAM_PATH} and {RTC_PATH}, the page is /\n"
UPGRADE_REQUIRED = (
    "Failed to open a WebSocket connection: this is a WebSocket endpoint and the request is no upgrade.\n\n"
    "You cannot access a WebSocket server directly with a browser. You need a WebSocket client.\n"
)
FORBIDDEN_ORIGIN = "the page's origin may not open WebSocket sessions here (asrlive serve --allowed-origins)\n"
# websockets' defaults, which the server had before uvicorn: a ping every 20 s, answered within 20 s.
PING_INTERVAL_S = PING_TIMEOUT_S = 20.0


class AsrServer:
    """``async with AsrServer(model, options) as server: await server.wait_closed()``.

    ``app`` is the ASGI application (Starlette): ``add_routes`` adds endpoints to it.
    """

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
        self.realtime: set[RealtimeConnection] = set()  # OpenAI Realtime sessions now open
        self.started_at = int(time.time())  # what /v1/models says the model was "created"
        self.peers: set[RTCPeerConnection] = set()  # WebRTC peer connections now open
        self._page = load_page()
        self._admitted = 0
        self._counter = 0
        self._sockets: list[socket.socket] = []
        self._port = 0
        self._uvicorn: uvicorn.Server | None = None
        self._ticking: asyncio.Task[None] | None = None
        self._requests = 0  # HTTP requests and WebSocket sessions in progress
        self._idle = asyncio.Event()  # none is
        self._idle.set()
        self._closed = asyncio.Event()
        self._stopping = False
        self.app = self._build_app()
        self.metrics.sessions.set_function(lambda: self._admitted)
        self.metrics.lag.set_function(self.worst_lag)
        self.metrics.peer_connections.set_function(lambda: len(self.peers))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        options = self.options
        self._sockets = listen(options.host, options.port)
        self._port = self._sockets[0].getsockname()[1]
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",
            http="h11",
            # websockets' sans-I/O protocol; the OpenAI Realtime clients' appends take up to 15 MiB
            ws=websocket_protocol(options.close_timeout_s, {REALTIME_PATH: MAX_MESSAGE_BYTES}),
            # Frames a little over the limit get a protocol error (and their session's finals);
            # far larger ones are cut off by the WebSocket layer with close code 1009.
            ws_max_size=4 * options.max_frame_bytes,
            ws_per_message_deflate=False,
            ws_ping_interval=PING_INTERVAL_S,
            ws_ping_timeout=PING_TIMEOUT_S,
            lifespan="off",  # the server starts and stops its own parts
            log_config=None,  # logging is the application's (asrlive serve configures it)
            access_log=False,
            proxy_headers=False,  # the peer is the socket's: no X-Forwarded-For from anyone
            server_header=False,
            ssl_certfile=options.certfile,
            ssl_keyfile=options.keyfile,
        )
        try:
            config.load()
            server = uvicorn.Server(config)
            server.lifespan = config.lifespan_class(config)  # as Server.serve() would, without its signal handlers
            self.scheduler.start()
            await server.startup(sockets=self._sockets)
        except BaseException:
            for sock in self._sockets:
                sock.close()
            raise
        self._uvicorn = server
        self._ticking = asyncio.create_task(server.main_loop())  # the Date header, once a second
        log.debug("listening on %s", self.url)  # the command line prints it, once

    @property
    def port(self) -> int:
        assert self._sockets, "start() first"
        return self._port

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
        """Drain: every open session gets its finals, ``done`` and close code 1001 (and every HTTP
        request in progress its answer); then the listeners close, the scheduler stops, then uvicorn.

        While the sessions drain the server still answers: ``/readyz`` says 503 ``stopping`` (a load
        balancer's check sees a replica that is leaving, not one that vanished), new sessions and
        requests are refused with ``server_busy``, which clients retry elsewhere.
        """
        if self._stopping:
            return
        self._stopping = True
        server = self._uvicorn
        assert server is not None and self._ticking is not None, "start() first"
        log.info("shutting down: finishing %d open sessions", len(self._connections) + len(self.realtime))
        for connection in list(self._connections):
            connection.interrupt(Ending.SHUTDOWN)
        for session in list(self.realtime):
            session.interrupt()
        await self._idle.wait()
        for listener in server.servers:
            listener.close()  # new connections are refused from now on
        await self.scheduler.stop()
        self._ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticking
        await server.shutdown(sockets=self._sockets)
        self._closed.set()
        log.info("stopped")

    async def wait_closed(self) -> None:
        assert self._uvicorn is not None, "start() first"
        await self._closed.wait()

    async def __aenter__(self) -> AsrServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- the ASGI application --------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What uvicorn runs: ``app``, counting the requests in progress (shutdown waits for them)."""
        self._requests += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self._requests -= 1
            if not self._requests:
                self._idle.set()

    def _build_app(self) -> Starlette:
        routes: list[BaseRoute] = [Route(path, self._page_file, methods=["GET"]) for path in self._page]
        routes += [
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route(LANGUAGES_PATH, self._languages, methods=["GET"]),
        ]
        for path in (STREAM_PATH, RTC_PATH):
            routes += [WebSocketRoute(path, self._websocket), Route(path, _upgrade_required, methods=["GET"])]
        routes += [
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
            WebSocketRoute(REALTIME_PATH, self._realtime),
            Route(REALTIME_PATH, _upgrade_required, methods=["GET"]),
        ]
        app = Starlette(routes=routes)
        app.router.redirect_slashes = False  # /healthz/ is not /healthz
        app.router.default = _not_found  # the 404 text, for WebSocket handshakes elsewhere too
        return app

    def add_routes(self, routes: Sequence[BaseRoute]) -> None:
        """More endpoints on the same host and port (Starlette routes); the existing ones come first."""
        self.app.router.routes.extend(routes)

    # -- connections -----------------------------------------------------------------------------

    async def _websocket(self, websocket: WebSocket) -> None:
        if await self._origin_refused(websocket):
            return
        ws = ServerWebSocket(websocket)
        try:
            await ws.accept()
        except ConnectionClosed:
            return
        await self._handle(ws)

    async def _models(self, request: Request) -> Response:
        return models(self)

    async def _transcriptions(self, request: Request) -> Response:
        return await transcriptions(self, request)

    async def _realtime(self, websocket: WebSocket) -> None:
        if await self._origin_refused(websocket):
            return
        await serve_realtime(self, websocket)

    async def _handle(self, ws: ServerWebSocket) -> None:
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

    async def _origin_refused(self, websocket: WebSocket) -> bool:
        """A page from an origin not allowed is refused at the handshake (403)."""
        origin = websocket.headers.get("origin")
        if origin_allowed(origin, websocket.headers.get("host"), self.options.allowed_origins):
            return False
        log.info("refused a WebSocket handshake from the origin %r", (origin or "")[:200])
        with contextlib.suppress(OSError):  # the client is gone already
            await websocket.send_denial_response(PlainTextResponse(FORBIDDEN_ORIGIN, 403))
        return True

    def _transport(self, ws: ServerWebSocket) -> Transport:
        if ws.path == RTC_PATH:
            return RtcTransport(ws, self.options, self.peers)
        return WebSocketTransport(ws, self.options)

    def admit(self, connection: Connection) -> ProtocolError | None:
        """None to admit the connection's session, else why it is refused."""
        if not authorized(connection.ws, self.options.token):
            return ProtocolError("unauthorized", "a valid token is required (Authorization: Bearer, or ?token=)")
        refused = self.admit_request()
        connection.admitted = refused is None
        return refused

    @property
    def has_aligner(self) -> bool:
        return self.aligner is not None

    # -- OpenAI-compatible endpoints (web/_openai.py, web/_realtime.py) -------------------------------

    def authorized(self, ws: ServerWebSocket) -> bool:
        return authorized(ws, self.options.token)

    def authorized_bearer(self, authorization: str | None) -> bool:
        """``Authorization: Bearer <token>`` (the API key an OpenAI client sends); any key without a token."""
        token = self.options.token
        return token is None or hmac.compare_digest(bearer(authorization).encode(), token.encode())

    def admit_request(self) -> ProtocolError | None:
        """A session slot for a request (an upload, a realtime session); None if taken, else why not."""
        unavailable = self.unavailable()
        if unavailable is not None:
            return unavailable[1]
        self._admitted += 1
        return None

    def unavailable(self) -> tuple[str, ProtocolError] | None:
        """Why a new session would be refused now (``stopping``, ``full`` or ``lagging``, and the
        refusal); None while one would be admitted. ``/readyz`` says the same."""
        options = self.options
        if self._stopping:
            return "stopping", ProtocolError("server_busy", "the server is shutting down")
        if self._admitted >= options.max_sessions:
            message = f"all {options.max_sessions} sessions are in use; try again later"
            return "full", ProtocolError("server_full", message)
        if options.max_lag_s and self.worst_lag() > options.max_lag_s:
            message = f"the open sessions' results are {self.worst_lag():.1f} s behind their audio; try again later"
            return "lagging", ProtocolError("server_busy", message)
        return None

    def release_request(self) -> None:
        self._admitted -= 1

    @property
    def max_upload_bytes(self) -> int:
        return self.options.max_upload_bytes

    def worst_lag(self) -> float:
        """The latest result latency of each open session, if recent; the worst of them."""
        now = time.monotonic()
        recent = [c.latency[0] for c in self._connections if now - c.latency[1] < WINDOW_S]
        return max(recent, default=0.0)

    # -- plain HTTP --------------------------------------------------------------------------------

    async def _page_file(self, request: Request) -> Response:
        body, content_type = self._page[request.url.path]
        # The files change with the server's version; a cached old script would speak an old protocol.
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return Response(body, media_type=content_type, headers=headers)

    async def _languages(self, request: Request) -> Response:
        return _json({"languages": LANGUAGES, "timestamps": self.aligner is not None})

    async def _healthz(self, request: Request) -> Response:
        body = {
            "status": "stopping" if self._stopping else "ok",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "model": self.model_name,
            "aligner": self.aligner.info.name if self.aligner is not None else None,
            "sessions": self._admitted,
            "max_sessions": self.options.max_sessions,
        }
        return _json(body)  # liveness: the process answers, draining or not

    async def _readyz(self, request: Request) -> Response:
        """Readiness as capacity: 200 while a new session would be admitted, else 503 and why."""
        unavailable = self.unavailable()
        body = {
            "status": "ready" if unavailable is None else unavailable[0],
            "sessions": self._admitted,
            "max_sessions": self.options.max_sessions,
            "lag_seconds": round(self.worst_lag(), 3),
        }
        if unavailable is not None:
            body["message"] = unavailable[1].message
        return _json(body, 200 if unavailable is None else 503)

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body) + "\n", status, media_type="application/json")


async def _upgrade_required(request: Request) -> Response:
    """A plain GET of a WebSocket endpoint (as websockets answered it)."""
    return PlainTextResponse(UPGRADE_REQUIRED, 426, headers={"Upgrade": "websocket"})


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Any other path; a WebSocket handshake there is refused with the same answer."""
    await PlainTextResponse(NOT_FOUND, 404)(scope, receive, send)


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


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` as asyncio's ``create_server`` binds them
    (SO_REUSEADDR, IPv6 sockets IPv6 only), here so that the port is known at once; with port 0
    every address gets the port the first one got."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
