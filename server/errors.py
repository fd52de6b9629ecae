"""HTTP errors: every failure is JSON `{"error": "..."}` with a 4xx status and one line, never a
stack trace (an unexpected exception is logged by the server and answered with a plain 500)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval import ClipdexError

log = logging.getLogger("clipdex.server")


class HTTPClipdexError(ClipdexError):
    """A ClipdexError that maps to an HTTP status other than 400."""

    status = 400


class NotFoundError(HTTPClipdexError):
    status = 404


class ForbiddenError(HTTPClipdexError):
    status = 403


class PayloadTooLargeError(HTTPClipdexError):
    status = 413


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def one_line(message: object) -> str:
    text = " ".join(str(message).split())
    return text[:500] or "error"


def _validation_message(exc: RequestValidationError) -> str:
    """`k: Input should be greater than or equal to 1` (the first problem, named by field)."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = [str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path", "header")]
    field = ".".join(where)
    text = str(first.get("msg", "invalid value"))
    return f"{field}: {text}" if field else text


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipdexError)
    async def _clipdex(_request: Request, exc: ClipdexError) -> JSONResponse:
        return error_response(getattr(exc, "status", 400), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = "not found"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The trace goes to the server's log only: a client learns nothing of the internals.
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, "internal error (the server's log has the details)")
