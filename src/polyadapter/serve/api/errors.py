"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for
every failure the API can answer: our own refusals, request validation (400, naming
the field), unknown routes and methods, and anything unexpected (500, logged)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("polyadapter.serve")

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError", 405: "BadRequestError", 409: "ConflictError", 413: "BadRequestError",
          429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "BadRequestError"), "param": param,
                      "code": code if code is not None else status}}


def response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(body(status, message, param, code), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return response(400, f"{where}: {first.get('msg', 'invalid')}{more}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return response(500, f"internal error: {type(e).__name__}: {e}")
