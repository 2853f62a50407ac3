"""Small network helpers shared by the launchers, the clients and the tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(target: str, timeout_s: float, still_alive: Callable[[], str | None] = lambda: None,
                 channel=None, tls=None) -> None:
    """Block until `target` answers grpc.health.v1 SERVING.

    `tls` (a ClientTLSConfig) makes the probe speak TLS. `still_alive()` returns None while the server's process lives, else a reason to give up
    at once (e.g. its exit code and last log lines) instead of waiting out the timeout.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    own = channel is None
    # Short reconnect backoff: a server that takes minutes to come up (vLLM) is seen at once.
    backoff = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
               ("grpc.max_reconnect_backoff_ms", 1000)]
    if own and tls is not None:  # a ClientTLSConfig: the server speaks TLS
        ch = tls.channel(target, backoff)
    else:
        ch = grpc.insecure_channel(target, options=backoff) if own else channel
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            reason = still_alive()
            if reason:
                raise RuntimeError(reason)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not healthy after {timeout_s:.0f}s")
            time.sleep(0.1)
    finally:
        if own:
            ch.close()
