"""The HTTP side of ``cmatrix serve``: a Starlette application (run by uvicorn in a thread of
the driver) with the OpenAI routes, a health check, the cluster's dashboard as JSON and the
web page. Generation itself happens in the :class:`~cmatrix.serve.worker.Worker`.

    GET  /                      the page: a chat box and the rank table
    GET  /health                {"status": "ok", ...}
    GET  /v1/models             the one model served
    POST /v1/chat/completions   OpenAI chat completions (streaming or not)
    POST /v1/completions        OpenAI text completions (streaming or not)
    GET  /cmatrix/cluster       per rank: host, backend, device, memory, share, ms and bytes per token
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from html import escape
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import openai_api
from .openai_api import ApiError, Completion
from .worker import Job, Worker


class ApiKey:
    """ASGI middleware: with a key set, every request must carry it, as ``Authorization: Bearer
    KEY`` (API clients) or as the password of HTTP Basic authentication (browsers ask for it:
    the page's 401 says so). Anything else gets a 401."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app, self.key = app, key

    def allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        given = dict(headers).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.key.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.key is None or scope["type"] != "http" or self.allowed(scope["headers"]):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "this server needs an API key: send 'Authorization: Bearer KEY'",
                         code="invalid_api_key")
        challenge = {"WWW-Authenticate": 'Basic realm="cmatrix", charset="UTF-8"'} \
            if scope["path"] == "/" else {"WWW-Authenticate": "Bearer"}
        await JSONResponse(error.body(), status_code=401, headers=challenge)(scope, receive, send)


#: the Host names a server without a key answers to (with any port)
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class LocalNames:
    """ASGI middleware: answer only requests whose Host header names this computer (a page
    elsewhere whose DNS name was pointed at 127.0.0.1 is refused: DNS rebinding)."""

    def __init__(self, app: Any, names: set[str]) -> None:
        self.app, self.names = app, {n.strip("[]").lower() for n in names}

    @staticmethod
    def host_of(header: str) -> str:
        if header.startswith("["):  # [::1]:8000
            return header[1:].partition("]")[0].lower()
        return header.rpartition(":")[0].lower() if header.count(":") == 1 else header.lower()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
        if scope["type"] != "http" or self.host_of(host) in self.names:
            await self.app(scope, receive, send)
            return
        error = ApiError(400, f"this server answers only requests to {', '.join(sorted(self.names))} "
                         "(start it with an API key to serve other names)", code="invalid_host")
        await JSONResponse(error.body(), status_code=400)(scope, receive, send)


def build(worker: Worker, model_name: str, api_key: str | None = None,
          extra_hosts: tuple[str, ...] = ()) -> Any:
    """The application serving ``worker``'s model as ``model_name``. Without ``api_key`` it
    answers only requests addressed to a loopback name (or one of ``extra_hosts``)."""
    model = worker.model
    started = int(time.time())

    def refused(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def page(_: Request) -> Response:
        html = resources.files("cmatrix.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(model_name)))

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "busy": worker.busy,
                             "queued": worker.jobs.qsize(), "ranks": model.cluster.size})

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": started, "owned_by": "cmatrix",
             "context_length": model.config.max_positions}]})

    async def cluster(_: Request) -> Response:
        return JSONResponse({**worker.dashboard, "model": model_name, "busy": worker.busy,
                             "queued": worker.jobs.qsize()})

    async def completions(request: Request, kind: str) -> Response:
        try:
            # JSON only: a web page elsewhere can send a text/plain POST without asking first
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise ApiError(415, "send the request as JSON (Content-Type: application/json)")
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not JSON") from None
            # rendering and tokenising a long prompt must not hold up the other streams
            c = await run_in_threadpool(openai_api.parse, body, kind, model, model.config.max_positions)
        except ApiError as error:
            return refused(error)
        job = Job(c, asyncio.get_running_loop())
        worker.submit(job)
        if c.stream:
            return StreamingResponse(_stream(job, model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(request, job, model_name)

    async def chat(request: Request) -> Response:
        return await completions(request, "chat")

    async def text(request: Request) -> Response:
        return await completions(request, "text")

    async def not_found(request: Request, _: Exception) -> Response:
        return refused(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def bad_method(request: Request, _: Exception) -> Response:
        return refused(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    app = Starlette(routes=[
        Route("/", page), Route("/health", health), Route("/v1/models", models),
        Route("/cmatrix/cluster", cluster),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", text, methods=["POST"]),
    ], exception_handlers={404: not_found, 405: bad_method})
    if api_key is None:  # only this computer's names: no DNS rebinding onto a keyless server
        app = LocalNames(app, {*LOCAL_NAMES, *extra_hosts})
    return ApiKey(app, api_key)


async def _stream(job: Job, model_name: str) -> Any:
    """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, [DONE].
    A client that goes away cancels its generation (Starlette cancels this generator)."""
    c: Completion = job.completion
    first = True
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield _event(openai_api.chunk(c, model_name, value, first=first))
                first = False
            elif kind == "error":
                yield _event(ApiError(500, value, kind="server_error").body())
                break
            else:
                if first and c.kind == "chat":
                    yield _event(openai_api.chunk(c, model_name, "", first=True))
                yield _event(openai_api.chunk(c, model_name, None,
                                              finish=openai_api.FINISH.get(value.stop_reason, "stop")))
                if c.include_usage:
                    yield _event(openai_api.chunk(c, model_name, usage_of=value))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # finished, or the client left: either way nothing more is wanted


async def _whole(request: Request, job: Job, model_name: str) -> Response:
    """Wait for the whole answer; a client that disconnects first cancels it."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                job.cancelled.set()
                return Response(status_code=499)
            kind, value = getter.result()
            if kind == "error":
                return JSONResponse(ApiError(500, value, kind="server_error").body(), status_code=500)
            if kind == "done":
                return JSONResponse(openai_api.response(job.completion, model_name, value.text, value))
    finally:
        gone.cancel()
        job.cancelled.set()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
