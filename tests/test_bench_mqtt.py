"""The benchmarks' minimal MQTT client against a private Mosquitto (MQTT 5) and a private
RabbitMQ node (MQTT 3.1.1 with a login): QoS 1 both ways, every acknowledgement accounted
for, and the broker's refusals raised."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.mqtt_raw import (
    MAX_PACKET_ID,
    Login,
    RawClient,
    RawMqttError,
    _read_varint,
    varint,
)
from gateway.broker import MosquittoBroker
from gateway.rabbitmq import RabbitNode
from ingest.transport import stop_client


def _paho(broker: MosquittoBroker, client_id: str) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


Done = Callable[[list[int], list[tuple[str, bytes]]], bool]


def _poll_until(
    client: RawClient, done: Done, timeout_s: float = 10.0
) -> tuple[list[int], list[tuple[str, bytes]]]:
    acked: list[int] = []
    received: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while not done(acked, received):
        assert time.monotonic() < deadline, (len(acked), len(received))
        a, r = client.poll(0.1)
        acked += a
        received += r
    return acked, received


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 2_097_152, 268_435_455])
def test_variable_byte_integers_round_trip(n: int) -> None:
    encoded = varint(n)
    assert _read_varint(encoded, 0) == (n, len(encoded))
    assert _read_varint(encoded[:-1], 0) is None  # cut short: not a value yet


@pytest.mark.parametrize("n", [-1, 268_435_456])
def test_a_variable_byte_integer_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match="variable byte integer"):
        varint(n)


def test_publishes_arrive_whole_and_are_all_acknowledged(mosquitto: MosquittoBroker) -> None:
    got: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    sub = _paho(mosquitto, "raw-test-sub")
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    sub.subscribe("raw/#", qos=1)
    assert subscribed.wait(10)
    pub = RawClient(mosquitto.host, mosquitto.port, "raw-test-pub")
    try:
        assert pub.receive_maximum >= 1
        sent = [(f"raw/{i % 7}", bytes([i % 256]) * (i % 300 + 1)) for i in range(600)]
        # Ids wrap past 65,535 in a long run: start near the end to cross it here.
        ids = [(MAX_PACKET_ID - 300 + i) % MAX_PACKET_ID + 1 for i in range(len(sent))]
        acked: list[int] = []
        for i, (topic, payload) in enumerate(sent):
            while i - len(acked) >= pub.receive_maximum:  # the broker's flow control
                acked += pub.poll(1.0)[0]
            pub.publish(RawClient.topic_name(topic), payload, ids[i])
        more, _ = _poll_until(pub, lambda a, _r: len(acked) + len(a) == len(sent))
        assert sorted(acked + more) == sorted(ids)
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(got) == sorted(sent)
    finally:
        pub.close()
        stop_client(sub)


def test_a_subscriber_acknowledges_what_it_receives(mosquitto: MosquittoBroker) -> None:
    """Mosquitto sends a client at most 20 unacknowledged QoS 1 messages: all 200 arriving
    shows each one was acknowledged."""
    sub = RawClient(mosquitto.host, mosquitto.port, "raw-test-listener")
    pub = _paho(mosquitto, "raw-test-paho-pub")
    try:
        sub.subscribe("down/+")
        infos = [pub.publish(f"down/{i % 3}", f"m{i}".encode(), qos=1) for i in range(200)]
        for info in infos:
            info.wait_for_publish(10)
        _, received = _poll_until(sub, lambda _a, r: len(r) >= 200)
        assert sorted(p for _, p in received) == sorted(f"m{i}".encode() for i in range(200))
        assert {t for t, _ in received} == {"down/0", "down/1", "down/2"}
    finally:
        sub.close()
        stop_client(pub)


def test_a_publish_the_broker_refuses_raises(mosquitto: MosquittoBroker) -> None:
    pub = RawClient(mosquitto.host, mosquitto.port, "raw-test-too-large")
    try:
        # Over the deploy config's max_packet_size (1 MiB): the broker drops the connection.
        with pytest.raises((RawMqttError, OSError)):  # noqa: PT012 - either step may see it
            pub.publish(RawClient.topic_name("raw/big"), b"x" * (2 << 20), 1)
            _poll_until(pub, lambda _a, _r: False, timeout_s=5)
    finally:
        pub.close()


def test_a_bad_packet_id_is_refused_before_sending(mosquitto: MosquittoBroker) -> None:
    pub = RawClient(mosquitto.host, mosquitto.port, "raw-test-bad-id")
    try:
        for bad in (0, MAX_PACKET_ID + 1):
            with pytest.raises(ValueError, match="packet id"):
                pub.publish(RawClient.topic_name("raw/x"), b"x", bad)
    finally:
        pub.close()


def test_no_broker_is_a_clear_error() -> None:
    with pytest.raises(OSError):
        RawClient("127.0.0.1", 1, "raw-test-nobody", timeout_s=2)


@pytest.mark.parametrize(
    ("connack", "error"),
    [
        (b"\x20\x01\x00", "malformed CONNACK"),
        (b"\x20\x03\x00\x87\x00", "connection refused, reason 0x87"),
        (b"\x90\x03\x00\x01\x00", "expected CONNACK"),
    ],
)
def test_a_broker_that_refuses_or_garbles_the_connection_is_a_clear_error(
    connack: bytes, error: str
) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def answer() -> None:
            peer, _ = server.accept()
            with peer:
                peer.recv(1024)  # the CONNECT
                peer.sendall(connack)
                peer.recv(1024)  # until the client goes

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(RawMqttError, match=error):
            RawClient("127.0.0.1", server.getsockname()[1], "raw-test-refused", timeout_s=5)
        thread.join(5)


@pytest.fixture
def rabbit_login(rabbit: RabbitNode) -> Login:
    """A user of the test's RabbitMQ node allowed everything, as the ingest bench's is."""
    user = f"raw-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    rabbit.add_user(user, password)
    rabbit.ctl("set_permissions", user, ".*", ".*", ".*")
    return Login(user, password, mqtt5=False)


def test_mqtt_311_with_a_login_publishes_and_receives_on_rabbitmq(
    rabbit: RabbitNode, rabbit_login: Login
) -> None:
    """RabbitMQ 3.10 speaks MQTT 3.1.1 only and wants a login: the load generator's other
    dialect (no property blocks, a return code in CONNACK), every publish acknowledged."""
    sub = RawClient("127.0.0.1", rabbit.mqtt_port, "raw-311-sub", login=rabbit_login)
    pub = RawClient("127.0.0.1", rabbit.mqtt_port, "raw-311-pub", login=rabbit_login)
    try:
        sub.subscribe("raw311/+")
        sent = [(f"raw311/{i % 3}", bytes([i % 256]) * (i % 200 + 1)) for i in range(300)]
        for i, (topic, payload) in enumerate(sent):
            pub.publish(RawClient.topic_name(topic), payload, i + 1)
        acked, _ = _poll_until(pub, lambda a, _r: len(a) == len(sent))
        assert sorted(acked) == list(range(1, len(sent) + 1))
        _, received = _poll_until(sub, lambda _a, r: len(r) >= len(sent))
        assert sorted(received) == sorted(sent)
    finally:
        pub.close()
        sub.close()


@pytest.mark.parametrize("password", ["wrong", None])
def test_rabbitmq_refusing_a_login_is_a_clear_error(
    rabbit: RabbitNode, rabbit_login: Login, password: str | None
) -> None:
    login = Login(rabbit_login.username if password else None, password, mqtt5=False)
    with pytest.raises(RawMqttError, match=r"connection refused, return code [45]"):
        RawClient("127.0.0.1", rabbit.mqtt_port, "raw-311-refused", login=login)
