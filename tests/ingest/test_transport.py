"""Stopping an MQTT client releases its descriptors at once: paho alone keeps its socket
pair (and the broker socket) open until the client object is garbage-collected, which in a
long-running hub or gateway worker is whenever the collector gets to it."""

from __future__ import annotations

import threading

import psutil  # type: ignore[import-untyped]

from gateway.broker import MosquittoBroker
from ingest.transport import make_client, stop_client


def test_a_stopped_client_holds_no_descriptor(mosquitto: MosquittoBroker) -> None:
    me = psutil.Process()
    before = me.num_fds()
    clients = []
    for i in range(3):
        client = make_client(f"transport-test-{i}")
        connected = threading.Event()
        client.on_connect = lambda *_, ev=connected: ev.set()
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        assert connected.wait(10), "no CONNACK from the test broker"
        clients.append(client)
    assert me.num_fds() >= before + 3 * 3  # a broker socket and a socket pair each
    for client in clients:
        stop_client(client)
    # The clients are still referenced: nothing was left to the garbage collector.
    assert me.num_fds() == before
