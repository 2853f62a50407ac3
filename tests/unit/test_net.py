"""free_port: picked below the kernel's ephemeral range, so that port-0 binds and outgoing
connections made before the caller binds it cannot take it."""

from __future__ import annotations

import random
import socket

import pytest

from services.common import net

pytestmark = pytest.mark.unit


def test_picks_below_the_ephemeral_range_and_the_port_binds():
    low, _ = net.ephemeral_range()
    if low - net._PICK_LOW < 1000:
        pytest.skip(f"ephemeral range starts at {low}: no room below it")
    for _ in range(20):
        port = net.free_port()
        assert net._PICK_LOW <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free, as promised


def test_a_taken_port_is_skipped(monkeypatch):
    monkeypatch.setattr(net, "ephemeral_range", lambda: (32768, 60999))
    first = random.Random(7).randrange(net._PICK_LOW, 32768)
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", first))
        except OSError:
            pytest.skip(f"port {first} is in use here")
        held.listen()
        port = net.free_port(rng=random.Random(7))
    assert port != first and net._PICK_LOW <= port < 32768


def test_no_room_below_the_range_falls_back_to_a_kernel_port(monkeypatch):
    class NoPick(random.Random):
        def randrange(self, *a, **k):
            raise AssertionError("picked below a range that leaves no room")

    monkeypatch.setattr(net, "ephemeral_range", lambda: (20500, 60999))
    port = net.free_port(rng=NoPick())
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ephemeral_range_reads_the_kernel_file(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert net.ephemeral_range(str(f)) == (40000, 50000)
    assert net.ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)
