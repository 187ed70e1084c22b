"""The asyncio server: WebSocket and WebRTC endpoints, the browser page, health and metrics."""

from ._server import RTC_PATH, STREAM_PATH, AsrServer, ServerOptions, run_server

__all__ = ["RTC_PATH", "STREAM_PATH", "AsrServer", "ServerOptions", "run_server"]
