"""The guard around the routes: request limits (body size, requests at once, time), the API key, and every error
sent as an OpenAI error object.

The body and concurrency limits are ASGI middleware (Guard) in front of FastAPI, which also records each
request for /metrics; the API key is a dependency of each route it covers; the time limit is enforced by the
generation routes, which stop decoding at the deadline and answer timeout_error().
"""

import asyncio
import hmac
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tweetlm.errors import UserError, check
from tweetlm.serve.metrics import Histogram, Metrics
from tweetlm.serve.schemas import APIError, FieldError, error_body


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    max_body_bytes: int = 1 << 20  # 1 MiB holds ~250k tokens of text, far past any context we serve
    max_concurrent: int = 64  # generation requests at once (running + queued); more get 429
    request_timeout: float = 300.0  # seconds from arrival to the last token; longer ones are cancelled
    # seconds a client has to send a whole request (head and body) once its connection opens or its previous
    # response ends; a slower one is disconnected (server.py: uvicorn has no such limit, README "Limits" says why 20)
    read_timeout: float = 20.0

    def __post_init__(self):
        for name in ("max_body_bytes", "max_concurrent", "request_timeout", "read_timeout"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")


class Guard:
    """ASGI middleware around every request: refuses a generation request past the concurrency limit (429), as
    soon as its head arrives, and a body over the limit (413), and records route, status and latency for
    /metrics. A generation request holds its place from admission to its last byte sent. Pure ASGI (no
    BaseHTTPMiddleware) so that streams pass through untouched and a stream's latency runs to its last byte.
    `routes`: the metrics labels (any other path is "other"); `generating`: those the concurrency limit counts."""

    def __init__(self, app, *, limits: ServeLimits, metrics: Metrics, routes: tuple[str, ...],
                 generating: tuple[str, ...]):
        self.app, self.limits, self.metrics, self.routes, self.generating = app, limits, metrics, routes, generating

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        start, status = loop.time(), 500
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        admitted = False
        try:
            if route in self.generating:
                # check and count in one step, before any await: a burst that arrives together cannot all pass
                # the check before the first of it is counted (the body is read after admission, in its place)
                if self.metrics.in_flight >= self.limits.max_concurrent:
                    return await _send_json(send_and_see, 429, error_body(
                        f"the server is answering {self.limits.max_concurrent} requests already: retry in a moment",
                        type="rate_limit_error", code="rate_limit_exceeded"), {"Retry-After": "1"})
                self.metrics.in_flight += 1
                admitted = True
            receive = await self._buffered_body(scope, receive, send_and_see)
            if receive is None:  # answered 413, or the client left while sending (nginx's 499, unanswered)
                status = 413 if status == 413 else 499
                return
            await self.app(scope, receive, send_and_see)
        finally:
            self.metrics.in_flight -= admitted  # every path: answered, refused, client gone, cancelled
            self.metrics.requests[route, status] += 1
            self.metrics.latency.setdefault(route, Histogram()).observe(loop.time() - start)

    async def _buffered_body(self, scope, receive, send):
        """Reads the whole body (at most max_body_bytes) and returns a `receive` that replays it, or None
        once it has answered 413 or the client has gone."""
        limit = self.limits.max_body_bytes
        too_large = error_body(f"the request body is over the server's limit of {limit} bytes",
                               code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, too_large)
            return None
        chunks, size, more = [], 0, True
        while more:  # chunked bodies carry no length: count as they come
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _send_json(send, 413, too_large)
                return None
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    raw = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *extra]})
    await send({"type": "http.response.body", "body": raw})


def api_key_check(api_key: str | None):
    """The dependency of the routes behind the API key: 401 unless `Authorization: Bearer KEY` (no key: open)."""

    def authorized(request: Request):
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return authorized


def timeout_error(limits: ServeLimits) -> APIError:
    """408 for a request past `request_timeout` (a stream already started sends its body as an error event)."""
    return APIError(408, f"the request ran past the server's limit of {limits.request_timeout:g} s: "
                         "ask for fewer tokens or retry later", type="timeout_error", code="request_timeout")


async def client_gone(http: Request) -> None:
    """Returns once the client has gone: a response that is not streamed waits on it beside its work."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def add_error_handlers(app: FastAPI) -> None:
    """Every error `app` raises as an OpenAI error object: APIError with its status, UserError and invalid
    bodies 400, unknown paths 404, wrong methods 405, anything else 500."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(UserError)
    async def _user_error(request, e: UserError):  # the engine's own checks (ranges, context, shutting down)
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):  # FastAPI's 422 becomes OpenAI's 400
        error = e.errors()[0]
        if error["type"] == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        cause = error.get("ctx", {}).get("error")
        param = cause.param if isinstance(cause, FieldError) else _param(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if param is None and error["type"] in ("missing", "model_attributes_type"):  # no body, or not an object
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        return JSONResponse(error_body(f"{param}: {message}" if param else message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown path (404), wrong method (405)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, code="not_found" if e.status_code == 404 else None),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"), status_code=500)


def _param(loc) -> str | None:
    """pydantic's ("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out or None
