"""Stopping an MQTT client releases its descriptors at once: paho alone keeps its socket
pair (and the broker socket) open until the client object is garbage-collected, which in a
long-running hub or gateway worker is whenever the collector gets to it. And stopping
survives paho's own race between loop_stop and its ending network thread."""

from __future__ import annotations

import sys
import threading

import paho.mqtt.client as mqtt_client
import psutil  # type: ignore[import-untyped]
import pytest

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


def test_stopping_survives_the_network_thread_ending_inside_loop_stop(
    mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho's loop_stop checks its thread, then reads it again to join it; the thread ends
    after the disconnect and clears it in between (eclipse-paho/paho.mqtt.python issue 872).
    Here the thread is made to end exactly there: loop_stop's own call to current_thread(),
    between the two reads, waits for it."""
    client = make_client("transport-test-race")
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    assert connected.wait(10), "no CONNACK from the test broker"
    network = client._thread
    assert network is not None
    test_thread = threading.current_thread()
    real_current_thread = threading.current_thread
    # The network thread, told of the disconnect, waits until loop_stop has read it once:
    # else, on a busy machine, it can end before loop_stop starts, and nothing is tested.
    release = threading.Event()

    def held(*_: object) -> None:
        if real_current_thread() is network:
            release.wait(10)

    client.on_disconnect = held

    def thread_ends_first() -> threading.Thread:
        me = real_current_thread()
        if me is test_thread and sys._getframe(1).f_code.co_name == "loop_stop":
            release.set()
            network.join(10)  # after disconnect() the loop ends and clears client._thread
            assert client._thread is None
            seen.append("the thread ended inside loop_stop")
        return me

    seen: list[str] = []

    monkeypatch.setattr(mqtt_client.threading, "current_thread", thread_ends_first)
    stop_client(client)
    monkeypatch.undo()
    assert seen == ["the thread ended inside loop_stop"]
    assert not network.is_alive()
    assert client._thread is None
