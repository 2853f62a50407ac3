"""What every loraloop gRPC server shares: one interceptor (bearer-token auth and the
mapping of domain errors to status codes), grpc.health.v1, reflection, TLS, graceful stop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import errors
from services.common.config import AuthConfig, Role, ServerConfig, TLSConfig
from services.common.status import status_of

log = logging.getLogger(__name__)

_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class AccessPolicy:
    """Which roles may call which method (full method name -> roles). Unlisted: denied."""

    roles_of_method: Mapping[str, frozenset[Role]]
    token_roles: Mapping[str, Role]
    enabled: bool = True

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Role | None:
        if method.startswith(_OPEN_PREFIXES) or not self.enabled:
            return None
        auth = next((v for k, v in metadata if k == "authorization"), None)
        if not isinstance(auth, str) or not auth.startswith("Bearer "):
            raise errors.Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        given = auth[len("Bearer ") :].encode()
        # Constant time: every token is compared in full (no early exit on the first match or
        # on the first differing byte), so timing tells nothing of a token's bytes or position.
        matched = [r for t, r in self.token_roles.items() if hmac.compare_digest(t.encode(), given)]
        role = matched[0] if matched else None
        if role is None:
            raise errors.Unauthenticated("unknown token")
        if role not in self.roles_of_method.get(method, frozenset()):
            raise errors.PermissionDenied(f"role {role!r} may not call {method}")
        return role


class _Malformed:
    """A request message that did not parse (its bytes are not the method's protobuf: corrupt
    wire format, a string field that is not UTF-8), handed to the handler in its place."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def invalid(self) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"malformed request message: {self.error}")


def _tolerant(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """`deserialize`, returning a _Malformed instead of raising: grpc answers a deserializer's
    exception UNKNOWN (unary requests) or INTERNAL (streamed ones), where the caller's bytes are
    at fault (INVALID_ARGUMENT)."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as e:
            return _Malformed(e)

    return parse


async def _checked(requests: AsyncIterator[object]) -> AsyncIterator[object]:
    async for r in requests:
        if isinstance(r, _Malformed):
            raise r.invalid()
        yield r


def _check(request: object, streamed: bool) -> object:
    if streamed:
        return _checked(request)  # type: ignore[arg-type]
    if isinstance(request, _Malformed):
        raise request.invalid()
    return request


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Checks the caller's token, then maps domain errors raised by a handler to statuses
    (a request message that does not parse: INVALID_ARGUMENT)."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(self, continuation, details):  # type: ignore[override]
        handler = await continuation(details)
        if handler is None:
            return None
        method, policy, streamed = details.method, self.policy, handler.request_streaming

        async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            code = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unexpected error in %s", method, exc_info=exc)
                await context.abort(code, f"internal error: {type(exc).__name__}")
            await context.abort(code, str(exc))

        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            async def streaming(request, context):
                try:
                    policy.check(method, context.invocation_metadata() or ())
                    async for item in inner(_check(request, streamed), context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:
                    await fail(context, e)

            make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                    else grpc.stream_stream_rpc_method_handler)
            fn = streaming
        else:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request, context):
                try:
                    policy.check(method, context.invocation_metadata() or ())
                    return await inner(_check(request, streamed), context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:
                    await fail(context, e)

            make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                    else grpc.stream_unary_rpc_method_handler)
            fn = unary
        return make(fn, request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer)


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials | None:
    if not tls.enabled:
        return None
    with open(tls.key_file, "rb") as k, open(tls.cert_file, "rb") as c:  # type: ignore[arg-type]
        pair = [(k.read(), c.read())]
    ca = Path(tls.ca_file).read_bytes() if tls.ca_file else None
    return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class Registration:
    """One gRPC service to serve: its generated add-function, servicer and full name."""

    add: Callable[[object, grpc.aio.Server], None]
    servicer: object
    full_name: str


async def serve(
    services: list[Registration],
    server_cfg: ServerConfig,
    auth: AuthConfig,
    tls: TLSConfig,
    roles_of_method: Mapping[str, frozenset[Role]],
    on_started: Callable[[int], None] | None = None,
    on_stopping: Callable[[], object] | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop_event`), then stop gracefully (running RPCs get
    `grace_s`). Signal handlers are installed only on the main thread."""
    token_roles = auth.token_roles() if auth.enabled else {}
    if auth.enabled and not token_roles:
        raise SystemExit(
            f"auth is enabled but no tokens are configured: set {auth.tokens_env}='learner:...,rollout:...'"
            " (or auth.tokens_file), or pass --auth.enabled=false for local experiments"
        )
    policy = AccessPolicy(roles_of_method, token_roles, auth.enabled)
    opts = [("grpc.max_receive_message_length", server_cfg.max_message_bytes),
            ("grpc.max_send_message_length", server_cfg.max_message_bytes),
            ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(interceptors=[ServiceInterceptor(policy)], options=opts)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in services:
        s.add(s.servicer, server)
    names = [s.full_name for s in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    addr = f"{server_cfg.host}:{server_cfg.port}"
    creds = server_credentials(tls)
    port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    if port == 0:
        raise SystemExit(f"cannot listen on {addr}")
    await server.start()
    for n in ["", *names]:
        await health_servicer.set(n, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening on %s:%d (tls=%s, auth=%s)", server_cfg.host, port, tls.enabled, auth.enabled)
    if on_started:
        on_started(port)

    stop = stop_event or asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping (grace %.1fs)", server_cfg.grace_s)
    await health_servicer.enter_graceful_shutdown()
    if on_stopping:
        res = on_stopping()
        if asyncio.iscoroutine(res):
            await res
    await server.stop(server_cfg.grace_s)


class ServerThread:
    """`serve(...)` on a thread of its own, with its own event loop, for a process whose main
    thread does other work (the learner's training loop): `start()` returns the port once it
    listens, `stop()` drains it (running RPCs get `grace_s`) and joins the thread."""

    def __init__(self, services: list[Registration], server_cfg: ServerConfig, auth: AuthConfig, tls: TLSConfig,
                 roles_of_method: Mapping[str, frozenset[Role]], name: str = "grpc-server") -> None:
        self._args = (services, server_cfg, auth, tls, roles_of_method)
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout_s: float = 30.0) -> int:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error:
            raise RuntimeError(f"gRPC server did not start: {self._error}")
        return self.port

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()

            def started(port: int) -> None:
                self.port = port
                self._ready.set()

            await serve(*self._args, on_started=started, stop_event=self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
