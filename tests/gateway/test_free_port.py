"""Ports for the servers tests, benchmarks and the cluster harness start: from below the
kernel's ephemeral range, so that no process's outgoing connection takes one between the
pick and the server's bind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import broker
from gateway.broker import PORT_FLOOR, free_port

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.fixture
def claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "claims"
    monkeypatch.setattr(broker, "PORT_CLAIMS", where)
    monkeypatch.setattr(broker, "_handed_out", set())  # what other tests drew does not count
    return where


def _bindable(count: int) -> list[int]:
    """Ports below the ephemeral range that nothing holds now (another test worker's servers
    may hold any given one)."""
    found: list[int] = []
    for port in range(24_000, 25_000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            break
    return found


def _picks(monkeypatch: pytest.MonkeyPatch, *ports: int) -> None:
    picks = iter(ports)
    monkeypatch.setattr(broker.random, "randrange", lambda *_: next(picks))
    monkeypatch.setattr(broker, "_ephemeral_low", lambda: 32_768)


def test_a_port_another_living_process_claimed_is_never_handed_out(
    claims: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held, free = _bindable(2)
    claims.mkdir()
    (claims / str(held)).write_text(str(os.getppid()))  # a living process: pytest's parent
    _picks(monkeypatch, held, free)
    assert free_port() == free
    assert (claims / str(free)).read_text() == str(os.getpid())


def test_the_claim_of_a_process_that_is_gone_is_taken_over(
    claims: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale, empty = _bindable(2)
    claims.mkdir()
    (claims / str(stale)).write_text(gone.stdout.strip())
    (claims / str(empty)).write_text("")  # a claimer that died before writing its pid
    _picks(monkeypatch, stale, empty)
    assert free_port() == stale
    assert free_port() == empty
    mine = str(os.getpid())
    assert (claims / str(stale)).read_text() == (claims / str(empty)).read_text() == mine


DRAW = """
import sys
from gateway import broker
broker._ephemeral_low = lambda: broker.PORT_FLOOR + 1_000
sys.stdin.readline()
print(" ".join(str(broker.free_port()) for _ in range(400)), flush=True)
sys.stdin.readline()  # alive until both have drawn: a claim holds while its process lives
"""


@pytest.mark.parametrize("run", range(3))
def test_two_processes_drawing_at_once_never_get_the_same_port(tmp_path: Path, run: int) -> None:
    # 2 x 400 ports out of 1,000: drawn independently, about 160 would be the same.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-c", DRAW]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    procs = [subprocess.Popen(command, env=env, cwd=ROOT, text=True, **pipes) for _ in range(2)]
    for p in procs:  # both start drawing together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    drawn = []
    for p in procs:
        assert p.stdout is not None
        drawn.append(p.stdout.readline().split())
    for p in procs:
        p.communicate("done\n", timeout=60)
    assert all(len(d) == 400 for d in drawn)
    assert all(PORT_FLOOR <= int(p) < PORT_FLOOR + 1_000 for d in drawn for p in d)
    assert not set(drawn[0]) & set(drawn[1])
