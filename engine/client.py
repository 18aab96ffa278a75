"""A client of the engine API (``/__ploy/api``) of a running server, for ``ploy`` commands.

It uses only the standard library's HTTP client, so the CLI adds no
dependency. Whatever the user can fix (a server that does not answer, a
refused token, an error answer) is a :class:`~engine.errors.CommandError`
whose message says what to do.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from engine.errors import CommandError
from engine.http import API, is_loopback

__all__ = ["ApiClient", "error_message", "quote"]


class ApiClient:
    """A small JSON client of the engine API on the standard library."""

    def __init__(self, url: str, token: str | None, timeout_s: float):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CommandError(f"--url must be an http(s) URL, got {url!r}")
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        # A proxy of the environment must not see a local server's token.
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON body); 401/403 and an unreachable server are CommandErrors."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + API + path, data, headers, method=method)  # noqa: S310 - scheme checked above
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, _decode(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError | socket.timeout):
                reason = f"no answer within {self.timeout_s:g} s"
            raise CommandError(f"cannot reach the ploy server at {self.url}: {reason} "
                               "(is `ploy dev` running? see --url)") from None
        if status in (401, 403):
            hint = "a valid --token or PLOY_ADMIN_TOKEN" if self.token else \
                "--token or PLOY_ADMIN_TOKEN"
            raise CommandError(f"the engine API at {self.url} refused the request ({status}): "
                               f"it needs {hint}")
        return status, payload

    def expect(self, method: str, path: str, body: Any = None, *,
               not_found: str | None = None) -> Any:
        """The decoded body of a successful answer; ``not_found`` is the error for a 404."""
        status, payload = self.call(method, path, body)
        if status == 404 and not_found is not None:
            raise CommandError(not_found)
        if status >= 400:
            raise CommandError(f"{method} {self.url}{API}{path} -> {status}: "
                               f"{error_message(payload)}")
        return payload


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace").strip()


def error_message(payload: Any) -> str:
    """The error text of an API error body, whatever its shape."""
    if isinstance(payload, dict):
        for key in ("error", "detail", "message"):
            if key in payload:
                value = payload[key]
                if isinstance(value, dict):
                    return error_message(value)
                return value if isinstance(value, str) else json.dumps(value)
    return payload if isinstance(payload, str) else json.dumps(payload)


def quote(value: str) -> str:
    """``value`` as one path segment."""
    return urllib.parse.quote(value, safe="")
