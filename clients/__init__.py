"""Clients: a small asyncio client of the streaming protocol, the load generator, local streaming."""

from ._client import Event, SessionRefused, Stream, connect

__all__ = ["Event", "SessionRefused", "Stream", "connect"]
