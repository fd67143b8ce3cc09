"""Ports for the servers tests, benchmarks and the cluster harness start: from below the
kernel's ephemeral range, so that no process's outgoing connection takes one between the
pick and the server's bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway import broker
from gateway.broker import PORT_FLOOR, free_port


def real_ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_come_from_below_the_ephemeral_range_and_never_twice() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(PORT_FLOOR <= p < real_ephemeral_low() for p in ports)
    # Each is free: a server can bind it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_something_listens_on_is_never_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, busy + 1 if busy + 1 < 65536 else busy - 1])
        monkeypatch.setattr(broker.random, "randrange", lambda *_: next(picks))
        monkeypatch.setattr(broker, "_ephemeral_low", lambda: 65_535)
        port = free_port()
    assert port != busy


@pytest.mark.parametrize("text", ["20100 60999\n", "", "x y\n", "9" * 40])
def test_a_range_with_no_room_below_or_unreadable_falls_back_to_the_kernels_pick(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "ip_local_port_range"
    fake.write_text(text)
    monkeypatch.setattr(broker, "_EPHEMERAL_RANGE", fake)
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
    if text.startswith("20100"):
        assert port >= real_ephemeral_low()  # no room below: the kernel picked it
