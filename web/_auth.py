"""The server's token, checked the same way for every endpoint.

A client proves it knows the token (``asrlive serve --token``) with ``Authorization: Bearer
<token>`` (what OpenAI's SDKs send as the API key) or, where a browser cannot set headers (a
WebSocket from a page), with the ``token`` query parameter. Without a token every request is allowed.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from urllib.parse import parse_qs


class Auth:
    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token is not None else None

    def allows(self, headers: Mapping[str, str], query: str) -> bool:
        """Whether the request's bearer header or ``token`` query parameter carries the token."""
        if self._token is None:
            return True
        offered = bearer(headers.get("authorization")) or parse_qs(query).get("token", [""])[0]
        return hmac.compare_digest(offered.encode(), self._token)


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case); "" if none."""
    header = authorization or ""
    return header[7:] if header.lower().startswith("bearer ") else ""
