"""The server's routes: the page, health, readiness, metrics, languages, the OpenAI REST endpoints
and the session endpoints (web/_sessions.py), as one Starlette application."""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from asrlive import __version__
from asrlive.engine import LANGUAGES
from asrlive.streaming import PROTOCOL_VERSION

from ._openai import RestHost, models, transcriptions
from ._options import REALTIME_PATH, RTC_PATH, STREAM_PATH
from ._sessions import SessionHost, serve_realtime, serve_stream

if TYPE_CHECKING:
    from ._admission import Admission

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


class RouteHost(SessionHost, RestHost, Protocol):
    """What the routes use of the server."""

    admission: Admission
    aligner_name: str | None


class Routes:
    """The application's endpoints over one server (``host``)."""

    def __init__(self, host: RouteHost) -> None:
        self.host = host
        self._page = load_page()

    def app(self) -> Starlette:
        routes: list[BaseRoute] = [Route(path, self._page_file, methods=["GET"]) for path in self._page]
        routes += [
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route(LANGUAGES_PATH, self._languages, methods=["GET"]),
        ]
        for path in (STREAM_PATH, RTC_PATH):
            routes += [WebSocketRoute(path, self._stream), Route(path, _upgrade_required, methods=["GET"])]
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

    async def _stream(self, websocket: WebSocket) -> None:
        await serve_stream(self.host, websocket)

    async def _realtime(self, websocket: WebSocket) -> None:
        await serve_realtime(self.host, websocket)

    async def _models(self, request: Request) -> Response:
        return models(self.host)

    async def _transcriptions(self, request: Request) -> Response:
        return await transcriptions(self.host, request)

    async def _page_file(self, request: Request) -> Response:
        body, content_type = self._page[request.url.path]
        # The files change with the server's version; a cached old script would speak an old protocol.
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return Response(body, media_type=content_type, headers=headers)

    async def _languages(self, request: Request) -> Response:
        return _json({"languages": LANGUAGES, "timestamps": self.host.has_aligner})

    async def _healthz(self, request: Request) -> Response:
        host = self.host
        body = {
            "status": "stopping" if host.admission.stopping else "ok",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "model": host.model_name,
            "aligner": host.aligner_name,
            "sessions": host.admission.admitted,
            "max_sessions": host.options.max_sessions,
        }
        return _json(body)  # liveness: the process answers, draining or not

    async def _readyz(self, request: Request) -> Response:
        """Readiness as capacity: 200 while a new session would be admitted, else 503 and why."""
        admission = self.host.admission
        unavailable = admission.unavailable()
        body = {
            "status": "ready" if unavailable is None else unavailable[0],
            "sessions": admission.admitted,
            "max_sessions": self.host.options.max_sessions,
            "lag_seconds": round(admission.worst_lag(), 3),
        }
        if unavailable is not None:
            body["message"] = unavailable[1].message
        return _json(body, 200 if unavailable is None else 503)

    async def _metrics(self, request: Request) -> Response:
        return Response(self.host.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body) + "\n", status, media_type="application/json")


async def _upgrade_required(request: Request) -> Response:
    """A plain GET of a WebSocket endpoint (as websockets answered it)."""
    return PlainTextResponse(UPGRADE_REQUIRED, 426, headers={"Upgrade": "websocket"})


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Any other path; a WebSocket handshake there is refused with the same answer."""
    await PlainTextResponse(NOT_FOUND, 404)(scope, receive, send)


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
