"""The OpenAI-compatible HTTP front of a rollout server (FastAPI, run by uvicorn on the
server's own event loop, beside its gRPC service).

- `GET /v1/models`: the base, each adapter name this server knows, each loaded `name@vN`.
- `POST /v1/completions`, `POST /v1/chat/completions`: vLLM's own handlers
  (services.rollout.openai_serving), streaming or not. `model` selects as gRPC does: `name` or
  `name@latest` resolves at admission, `name@vN` pins, "" or the base's id is the base. The
  response's `model` and the `x-loraloop-adapter` header name the version that generated it.
- `GET /metrics` (Prometheus text), `GET /health`: no token needed.
- `Authorization: Bearer` with the gRPC tokens (any role may generate); errors are OpenAI's
  error JSON: 401/403, 404 for an unknown model or version, 400 for bad parameters, 429 past
  `http.max_concurrent` requests in flight, 503 while the server stops.
- Priority: vLLM's (`priority` in the body or X-Vllm-Priority), floored at the configured
  users' priority, so a user can yield to training but not jump ahead of what is configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common import errors
from services.common.grpc_server import AccessPolicy
from services.common.names import parse_selector
from services.rollout.metrics import RolloutMetrics
from services.rollout.openai_serving import OpenAIHandlers
from services.rollout.requests import MAX_N

if TYPE_CHECKING:
    from services.common.records import AdapterVersion
    from services.rollout.adapters import AdapterManager, LoadedVersion
    from services.rollout.config import HttpConfig

log = logging.getLogger(__name__)
ADAPTER_HEADER = "x-loraloop-adapter"
PRIORITY_HEADER = "x-vllm-priority"  # vLLM's, lower-cased as ASGI headers are
_INFER = frozenset({"client", "learner", "rollout"})
ROLES_OF_ROUTE = {"/v1/models": _INFER, "/v1/completions": _INFER, "/v1/chat/completions": _INFER}
HTTP_OF: dict[type[errors.LoraloopError], int] = {
    errors.NotFound: 404, errors.InvalidArgument: 400, errors.FailedPrecondition: 400,
    errors.Unauthenticated: 401, errors.PermissionDenied: 403, errors.ResourceExhausted: 429,
    errors.Unavailable: 503, errors.DataLoss: 502,
}


MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body past this is refused (413) before it is parsed


class _TooLarge(Exception):
    pass


async def _read_body(request: Request) -> bytes:
    """The request's body, refused (_TooLarge) once it passes MAX_BODY_BYTES, declared or sent:
    uvicorn and Starlette read any size into memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLarge(f"request body of {declared} bytes exceeds {MAX_BODY_BYTES}")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _TooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        parts.append(chunk)
    return b"".join(parts)


def http_status_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_OF:
            return HTTP_OF[cls]  # type: ignore[index]
    return 500


class AdapterCatalog(Protocol):
    """What /v1/models lists (BrokerClient fits; called from a thread)."""

    def list_adapters(self) -> list[Any]: ...
    def list_versions(self, name: str) -> tuple[list[AdapterVersion], int]: ...


class OpenAIFront:
    """The routes and their admission: auth, the in-flight bound, the adapter version."""

    def __init__(self, handlers: OpenAIHandlers, manager: AdapterManager, catalog: AdapterCatalog,
                 metrics: RolloutMetrics, policy: AccessPolicy, max_concurrent: int, min_priority: int = 0) -> None:
        self.h, self.manager, self.catalog, self.metrics, self.policy = handlers, manager, catalog, metrics, policy
        self.max_concurrent = max_concurrent
        self.min_priority = min_priority
        self.in_flight = 0
        metrics.in_flight.labels("http").set_function(lambda: self.in_flight)
        self.stopping = False
        self.app = self._build_app()

    # ------------------------------------------------------------ helpers

    def _error(self, status: int, message: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.h.error(message, status, param).model_dump(), status_code=status, headers=headers)

    def _auth(self, request: Request) -> None:
        self.policy.check(request.url.path, request.headers.items())

    def _is_base(self, model: str | None) -> bool:
        return not model or model == self.h.base_id

    def _prioritize(self, req: Any, request: Request) -> Request:
        """The request's vLLM priority (body `priority` or the X-Vllm-Priority header, as `vllm
        serve` reads them), never earlier than `min_priority` (the configured users' priority):
        set on `req`; the header is taken off the request handed to vLLM."""
        asked = getattr(req, "priority", 0) or 0
        header = request.headers.get(PRIORITY_HEADER)
        if header is not None:
            with contextlib.suppress(ValueError):
                asked = int(header)
            scope = dict(request.scope)
            scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k.lower() != PRIORITY_HEADER.encode()]
            request = Request(scope, request.receive)
        req.priority = max(asked, self.min_priority)
        return request

    async def _hold(self, model: str, stack: contextlib.AsyncExitStack) -> LoadedVersion | None:
        """Enter the adapter version `model` selects for the request's length (None: base)."""
        if self._is_base(model):
            return None
        try:
            parse_selector(model)
        except errors.InvalidArgument:
            raise errors.NotFound(f"The model `{model}` does not exist (base: `{self.h.base_id}`; adapters: "
                                  "NAME, NAME@latest or NAME@vN)") from None
        return await stack.enter_async_context(self.manager.acquire(model))

    # ------------------------------------------------------------ routes

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="loraloop rollout (OpenAI-compatible)", docs_url=None, redoc_url=None,
                      openapi_url=None)
        app.add_exception_handler(StarletteHTTPException, self._http_exception)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        return app

    async def _http_exception(self, request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own answers (an unknown path: 404, a wrong method: 405) as OpenAI error JSON."""
        return self._error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def health(self) -> Response:
        return PlainTextResponse("stopping" if self.stopping else "ok", status_code=503 if self.stopping else 200)

    async def prometheus(self) -> Response:
        self.metrics.adapters_loaded.set(len(self.manager.loaded))
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
            ids = await asyncio.to_thread(self._adapter_ids)
        except errors.LoraloopError as e:
            return self._error(http_status_of(e), str(e))
        h = self.h
        cards = [h.ModelCard(id=h.base_id, root=h.base_id, max_model_len=h.max_model_len, owned_by="loraloop")]
        cards += [h.ModelCard(id=i, root=root, parent=h.base_id, max_model_len=h.max_model_len, owned_by="loraloop")
                  for i, root in ids]
        return JSONResponse(h.ModelList(data=cards).model_dump())

    def _adapter_ids(self) -> list[tuple[str, str]]:
        """(id, root) for each adapter name the broker has (root: its latest `name@vN`) and each
        live version; versions loaded here that retention has since dropped are listed too."""
        out: dict[str, str] = {}
        summaries = self.catalog.list_adapters()
        for summary in summaries:
            out[summary.name] = f"{summary.name}@v{summary.latest_version}"
        # One ListVersions per name, 16 at a time (1,000 adapters: ~1 s one after another).
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            for records, _ in pool.map(self.catalog.list_versions, [x.name for x in summaries]):
                out |= {r.ref: r.ref for r in records}
        out |= {lv.record.ref: lv.record.ref for lv in self.manager.loaded.values()}
        return sorted(out.items())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", self.h.CompletionRequest, self.h.completion.create_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat", self.h.ChatCompletionRequest, self.h.chat.create_chat_completion)

    async def _generate(self, request: Request, endpoint: str, model_type: type,
                        create: Callable[[Any, Request], Any]) -> Response:
        t0 = time.perf_counter()
        met = self.metrics
        try:
            self._auth(request)
        except errors.LoraloopError as e:
            met.rejected.labels("http", "auth").inc()
            return self._error(http_status_of(e), str(e))
        if self.stopping:
            met.rejected.labels("http", "stopping").inc()
            return self._error(503, "server is stopping; retry on another replica", headers={"retry-after": "1"})
        if self.in_flight >= self.max_concurrent:
            met.rejected.labels("http", "busy").inc()
            return self._error(429, f"{self.in_flight} requests in flight (http.max_concurrent); retry later",
                               headers={"retry-after": "1"})
        # Take the slot at the check, before awaiting the body: taken after it, requests arriving
        # while others read their bodies all passed (640 streams vs max_concurrent 512: ~630 in flight).
        self.in_flight += 1
        admitted = False
        try:
            try:
                body = await _read_body(request)
            except _TooLarge as e:
                return self._error(413, str(e))
            try:
                req = model_type.model_validate(json.loads(body))
            except (ValueError, RecursionError, ValidationError, self.h.ClientError) as e:
                # json.JSONDecodeError is a ValueError; JSON nested 100,000 deep raises RecursionError and
                # vLLM's own validation error (prompt "") is no ValueError: both answered 500
                return self._error(400, f"invalid request: {e}")
            n = getattr(req, "n", None) or 1
            if n > MAX_N:  # as gRPC's Generate: vLLM's own bound (16384) lets one request hold the engine for minutes
                return self._error(400, f"n={n} exceeds {MAX_N}", "n")
            request = self._prioritize(req, request)
            user_wants_usage = bool(getattr(req, "stream_options", None) and req.stream_options.include_usage)
            if req.stream:  # always ask vLLM for the usage chunk (the metrics read it), drop it if not asked
                opts = req.stream_options or self.h.StreamOptions()
                req.stream_options = opts.model_copy(update={"include_usage": True})
            admitted = True  # from here the request's own end (_done) gives the slot back
        finally:
            if not admitted:
                self.in_flight -= 1
        stack = contextlib.AsyncExitStack()
        status, label = 200, "base"
        streaming = False
        try:
            lv = await self._hold(req.model, stack)
            label = lv.record.name if lv else "base"
            served = lv.record.ref if lv else self.h.base_id
            req.model = served
            out = await create(req, request)
            if isinstance(out, self.h.ErrorResponse):
                status = out.error.code
                return JSONResponse(out.model_dump(), status_code=status)
            headers = {ADAPTER_HEADER: served}
            if not hasattr(out, "__aiter__"):
                usage = getattr(out, "usage", None)
                if usage is not None:
                    met.prompt_tokens.labels("http", label).inc(usage.prompt_tokens)
                    met.generated_tokens.labels("http", label).inc(usage.completion_tokens or 0)
                return JSONResponse(out.model_dump(), headers=headers)
            streaming = True
            release = _Release(self, stack, endpoint, label, t0)
            return _HeldStream(self._stream(out, release, t0, label, user_wants_usage), release,
                               media_type="text/event-stream", headers=headers)
        except errors.LoraloopError as e:
            status = http_status_of(e)
            param = "model" if isinstance(e, errors.NotFound | errors.FailedPrecondition) else None
            return self._error(status, str(e), param)
        except Exception as e:  # what vLLM's handlers raise (validation errors, ...): its own mapping
            err = self.h.error_of(e)
            status = err.error.code
            if status >= 500:
                log.exception("%s failed", endpoint)
            return JSONResponse(err.model_dump(), status_code=status)
        finally:
            if not streaming:
                await stack.aclose()
                self._done(endpoint, label, str(status), t0)

    def _done(self, endpoint: str, label: str, status: str, t0: float) -> None:
        self.in_flight -= 1
        m = self.metrics
        m.requests.labels("http", endpoint, label, status).inc()
        m.duration.labels("http", endpoint).observe(time.perf_counter() - t0)

    async def _stream(self, chunks: AsyncIterator[str], release: _Release, t0: float, label: str,
                      user_wants_usage: bool) -> AsyncIterator[str]:
        """vLLM's SSE chunks, passed on while the request holds its adapter version."""
        m, first, status = self.metrics, True, "ok"
        try:
            async for chunk in chunks:
                if '"usage":{' in chunk and '"choices":[]' in chunk:  # the final usage chunk
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        usage = json.loads(chunk.removeprefix("data: "))["usage"]
                        m.prompt_tokens.labels("http", label).inc(usage["prompt_tokens"])
                        m.generated_tokens.labels("http", label).inc(usage.get("completion_tokens") or 0)
                    if not user_wants_usage:
                        continue
                elif first and '"choices":[{' in chunk:
                    first = False
                    m.ttft.labels("http", label).observe(time.perf_counter() - t0)
                yield chunk
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception:
            status = "error"
            raise
        finally:
            await release(status if status != "ok" else "200")


class _Release:
    """Once per streamed request: let go of its adapter version and count it done."""

    def __init__(self, front: OpenAIFront, stack: contextlib.AsyncExitStack, endpoint: str, label: str,
                 t0: float) -> None:
        self.front, self.stack, self.endpoint, self.label, self.t0 = front, stack, endpoint, label, t0
        self.done = False

    async def __call__(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        try:
            await self.stack.aclose()
        finally:
            self.front._done(self.endpoint, self.label, status, self.t0)


class _HeldStream(StreamingResponse):
    """A StreamingResponse that releases its request's hold however it ends. A client gone
    before the first chunk (the headers' send fails, or the disconnect cancels the response)
    leaves the body generator never started, so its `finally` never runs: without this, the
    in-flight count and the version's active count would stay up for good (the version never
    unloaded)."""

    def __init__(self, body: AsyncIterator[str], release: _Release, **kw: Any) -> None:
        super().__init__(body, **kw)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]  # started: its finally releases
            await self.release("cancelled")  # never started: nobody else will


class HttpServer:
    """uvicorn on the running event loop; its own signal handling off (the gRPC server's
    SIGTERM handler stops both)."""

    def __init__(self, front: OpenAIFront, cfg: HttpConfig, tls: Any) -> None:
        self.front, self.cfg, self.tls = front, cfg, tls
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it. Without it every response (SSE chunks too) waited on
        # Nagle + the client's delayed ACK: GET /health took 44 ms (vllm serve's: 1.1 ms) and
        # time to first token on the tiny model 47 ms (vllm serve's: 11.5 ms); with it 0.9 / 11.9.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as e:
            sock.close()
            raise SystemExit(f"cannot listen on {self.cfg.host}:{self.cfg.port} (http): {e}") from None
        self.port = sock.getsockname()[1]
        ssl: dict[str, Any] = {}
        if self.tls.enabled:
            import ssl as ssl_mod

            ssl = dict(ssl_certfile=self.tls.cert_file, ssl_keyfile=self.tls.key_file)
            if self.tls.ca_file:
                ssl |= dict(ssl_ca_certs=self.tls.ca_file, ssl_cert_reqs=ssl_mod.CERT_REQUIRED)
        config = uvicorn.Config(self.front.app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=self.cfg.grace_s, **ssl)
        server = self._server = _NoSignalServer(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise SystemExit("http server stopped during start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        self.front.stopping = True
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task


class _NoSignalServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield
