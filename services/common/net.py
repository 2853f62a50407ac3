"""Small network helpers shared by the launchers, the clients and the tests."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

# Ray's workers bind 10002-19999 by default; ports the kernel hands out for port-0 binds and
# outgoing connections come from net.ipv4.ip_local_port_range (32768-60999 by default).
_PICK_LOW = 20000


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for port-0 binds and outgoing connections (Linux; else 32768-60999)."""
    try:
        low, high = (int(x) for x in Path(path).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port that was free a moment ago, for a server the caller starts soon after.

    Picked below the kernel's ephemeral range, so that no port-0 bind or outgoing
    connection made in between (vLLM's engine sockets, gloo, gRPC clients) can take it:
    a port the kernel itself handed out could be handed out again at once, and was (a
    rollout under Ray lost its port to its own vLLM engine). Falls back to a kernel-chosen
    port where the range leaves no room below it."""
    low, _ = ephemeral_range()
    rng = rng or random.SystemRandom()
    if low - _PICK_LOW >= 1000:
        for _ in range(64):
            port = rng.randrange(_PICK_LOW, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
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
