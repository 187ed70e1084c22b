"""The asyncio server: WebSocket and WebRTC endpoints, the browser page, health and metrics.

``ServerOptions`` and the paths load without the engine; the server itself (torch, aiortc) is
imported on first use (PEP 562), so the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._options import RTC_PATH, STREAM_PATH, ServerOptions

if TYPE_CHECKING:
    from ._server import AsrServer, run_server

_LAZY = ("AsrServer", "run_server")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("._server", __name__), name)
    globals()[name] = value
    return value


__all__ = ["RTC_PATH", "STREAM_PATH", "AsrServer", "ServerOptions", "run_server"]
