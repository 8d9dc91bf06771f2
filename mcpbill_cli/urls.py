"""The one check of an http(s) URL mcpbill is told to send to: a webhook endpoint, a proxy's
upstream. Refused when it is given, not when the first request fails."""

from __future__ import annotations

from urllib.parse import urlsplit


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL with a host and, if it names one, a port from 1 to
    65535 (an unclosed IPv6 address, a port that is not a number); ``None`` when it is."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as error:  # also "Invalid IPv6 URL"
        return str(error)
    if parts.scheme not in ("http", "https"):
        return "not http or https"
    if not parts.hostname:
        return "no host"
    if port == 0:
        return "port 0"
    return None
