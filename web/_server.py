"""The asyncio server: composition and lifecycle.

``AsrServer`` puts the parts together: the scheduler (one inference thread: web/_scheduler.py),
admission and readiness (web/_admission.py), the token check (web/_auth.py), the routes
(web/_routes.py: the page, health, metrics, REST, and the session endpoints of web/_sessions.py,
each session driven by web/_connection.py), and the HTTP/WebSocket server (web/_http.py, h11 and
websockets' sans-I/O protocol) that serves them on sockets it binds itself. It starts them, and
stops them in order: every session drains first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from asrlive.engine import AsrModel, DecodingOptions
from asrlive.engine._aligner import Aligner

from ._admission import Admission
from ._auth import Auth
from ._http import HttpLimits, HttpServer
from ._metrics import Metrics
from ._options import REALTIME_MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from ._options import REALTIME_PATH, STREAM_PATH, ServerOptions
from ._routes import Routes
from ._rtc import PeerConnections
from ._scheduler import Scheduler, TranscriberFactory

log = logging.getLogger("asrlive.server")

# websockets' own server's defaults: a ping every 20 s, answered within 20 s.
PING_INTERVAL_S = PING_TIMEOUT_S = 20.0


class AsrServer:
    """``async with AsrServer(model, options) as server: await server.wait_closed()``.

    ``app`` is the ASGI application (Starlette): ``add_routes`` adds endpoints to it.
    """

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
        self.aligner_name = aligner.info.name if aligner is not None else None
        # What a client's context may not spell (its control tokens): the tokenizer's, read once.
        self.control_tokens = tuple(model.tokenizer.get_added_vocab())
        self.options = options
        self.metrics = Metrics()
        self.scheduler = Scheduler(model, self.metrics, options.max_batch, make_transcriber, aligner)
        self.admission = Admission(options)
        self.auth = Auth(options.token)
        self.peers = PeerConnections()  # WebRTC peer connections now open
        self.started_at = int(time.time())  # what /v1/models says the model was "created"
        self._sockets: list[socket.socket] = []
        self._port = 0
        self._http: HttpServer | None = None
        self._requests = 0  # HTTP requests and WebSocket sessions in progress
        self._idle = asyncio.Event()  # none is
        self._idle.set()
        self._closed = asyncio.Event()
        self.app = Routes(self).app()
        self.metrics.sessions.set_function(lambda: self.admission.admitted)
        self.metrics.lag.set_function(self.admission.worst_lag)
        self.metrics.peer_connections.set_function(lambda: len(self.peers))

    @property
    def has_aligner(self) -> bool:
        return self.aligner is not None

    @property
    def max_upload_bytes(self) -> int:
        return self.options.max_upload_bytes

    @property
    def decoding(self) -> DecodingOptions:
        return self.options.decoding

    def add_routes(self, routes: Sequence[BaseRoute]) -> None:
        """More endpoints on the same host and port (Starlette routes); the existing ones come first."""
        self.app.router.routes.extend(routes)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        options = self.options
        self._sockets = listen(options.host, options.port)
        self._port = self._sockets[0].getsockname()[1]
        limits = HttpLimits(
            handshake_timeout_s=options.handshake_timeout_s,
            body_timeout_s=options.body_timeout_s,
            keepalive_timeout_s=options.keepalive_timeout_s,
            max_connections=options.max_connections,
            close_timeout_s=options.close_timeout_s,
            # Frames a little over the limit get a protocol error (and their session's finals);
            # far larger ones are cut off by the WebSocket layer with close code 1009.
            max_message_bytes=4 * options.max_frame_bytes,
            # the OpenAI Realtime clients' appends take up to 15 MiB
            path_message_bytes={REALTIME_PATH: MAX_MESSAGE_BYTES},
            ping_interval_s=PING_INTERVAL_S,
            ping_timeout_s=PING_TIMEOUT_S,
        )
        server = HttpServer(self._asgi, limits, options.tls_context(), self.metrics.connections_closed_by)
        try:
            self.scheduler.start()
            await server.start(self._sockets)
        except BaseException:
            server.stop_accepting()
            for sock in self._sockets:
                sock.close()
            raise
        self._http = server
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
        request in progress its answer); then the listeners close, the scheduler stops, then the HTTP
        server closes what is left (web/_http.py: closing handshakes under way may finish).

        While the sessions drain the server still answers: ``/readyz`` says 503 ``stopping`` (a load
        balancer's check sees a replica that is leaving, not one that vanished), new sessions and
        requests are refused with ``server_busy``, which clients retry elsewhere.
        """
        if self.admission.stopping:
            return
        connections = self.admission.stop()
        server = self._http
        assert server is not None, "start() first"
        log.info("shutting down: finishing %d open sessions", len(connections))
        for connection in connections:
            connection.interrupt()
        await self._idle.wait()
        server.stop_accepting()  # new connections are refused from now on
        await self.scheduler.stop()
        await server.shutdown()
        self._closed.set()
        log.info("stopped")

    async def wait_closed(self) -> None:
        assert self._http is not None, "start() first"
        await self._closed.wait()

    async def __aenter__(self) -> AsrServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- the ASGI application --------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """What the HTTP server runs: ``app``, counting the requests in progress (shutdown waits for them)."""
        self._requests += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self._requests -= 1
            if not self._requests:
                self._idle.set()


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
