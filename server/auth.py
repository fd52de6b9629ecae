"""Who may talk to the server: loopback by default, a bearer token otherwise.

- Without a token the server only listens on loopback, and only answers requests whose Host
  header names a loopback address: a web page elsewhere cannot reach it through DNS rebinding.
- With a token every request needs `Authorization: Bearer TOKEN`, or the session cookie the page
  gets by opening `/?token=TOKEN` once: the server answers that with the cookie (HttpOnly,
  SameSite=Strict) and a redirect to the same address without the token, so the token leaves
  the address bar and history, and `<img>` tags (which cannot send headers) are authorised too.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.datastructures import Headers, MutableHeaders

from retrieval import ClipdexError

from .errors import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "clipdex_session"
MIN_TOKEN_LENGTH = 8


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ClipdexError(
            f"--token must be at least {MIN_TOKEN_LENGTH} characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
        )


def check_bind(host: str, token: str | None) -> None:
    """Refuse a setting that would expose the photos: a non-loopback address without a token."""
    if token is not None:
        check_token(token)
        return
    if not is_loopback(host):
        raise ClipdexError(
            f"refusing to listen on {host} without --token: anyone who can reach it could browse your "
            "photos (give --token TOKEN, or keep the default --host 127.0.0.1)"
        )


def session_value(token: str) -> str:
    # The cookie holds a value derived from the token, not the token itself: a leaked cookie
    # is not a bearer token for scripts.
    return hmac.new(token.encode(), b"clipdex page session", hashlib.sha256).hexdigest()


class AccessGuard:
    """ASGI middleware: the host check, the token check, the body size cap, security headers."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int):
        self.app = app
        self.token = token
        self.max_body = max_body
        self._session = session_value(token) if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, _with_security_headers(send))

    def _refusal(self, scope: Scope, headers: Headers):  # type: ignore[no-untyped-def]
        if self.token is None:
            host = _hostname(headers.get("host", ""))
            if not is_loopback(host):
                return error_response(
                    403, "this server answers only to loopback addresses (start it with --token to share it)"
                )
        elif not self._authorized(headers):
            exchange = self._token_exchange(scope)
            if exchange is not None:
                return exchange
            return error_response(
                401,
                "this server needs a token: send 'Authorization: Bearer TOKEN', or open /?token=TOKEN once",
                {"WWW-Authenticate": "Bearer"},
            )
        return self._body_refusal(scope, headers)

    def _authorized(self, headers: Headers) -> bool:
        assert self.token is not None and self._session is not None
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return True
        cookie = _cookie(headers.get("cookie", ""), COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode())

    def _token_exchange(self, scope: Scope):  # type: ignore[no-untyped-def]
        """`GET /?token=TOKEN` (the page, opened once): the cookie, and the same address without
        the token. Only the page takes a token in the address: addresses end up in logs."""
        assert self.token is not None and self._session is not None
        if scope["method"] != "GET" or scope["path"] != "/":
            return None
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in pairs if k == "token"]
        if len(given) != 1 or not hmac.compare_digest(given[0].encode(), self.token.encode()):
            return None
        rest = urlencode([(k, v) for k, v in pairs if k != "token"])
        from starlette.responses import RedirectResponse

        response = RedirectResponse("/" + (f"?{rest}" if rest else ""), status_code=303)
        response.set_cookie(COOKIE, self._session, httponly=True, samesite="strict", path="/")
        return response

    def _body_refusal(self, scope: Scope, headers: Headers):  # type: ignore[no-untyped-def]
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        length = headers.get("content-length")
        if length is None:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return error_response(411, "send the request body with a Content-Length")
            return None
        try:
            size = int(length)
        except ValueError:
            return error_response(400, "bad Content-Length")
        if size > self.max_body:
            return error_response(413, f"request body over the {self.max_body // (1 << 20)} MB limit")
        return None


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers.setdefault("X-Content-Type-Options", "nosniff")
            headers.setdefault("Referrer-Policy", "no-referrer")
            headers.setdefault("X-Frame-Options", "DENY")
        await send(message)

    return wrapped


def _hostname(host_header: str) -> str:
    try:
        return urlsplit("//" + host_header).hostname or ""
    except ValueError:
        return ""


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
