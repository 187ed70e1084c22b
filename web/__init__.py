"""The asyncio server: WebSocket endpoint, health and metrics (WebRTC ingress and the page: to come)."""

from ._server import STREAM_PATH, AsrServer, ServerOptions, run_server

__all__ = ["STREAM_PATH", "AsrServer", "ServerOptions", "run_server"]
