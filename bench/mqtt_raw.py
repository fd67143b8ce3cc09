"""A minimal MQTT client for the benchmarks' load generators: QoS 1 publishes and one QoS 1
subscription, on the caller's thread, over plain TCP; MQTT 5, or 3.1.1 for RabbitMQ 3.10's
MQTT plugin (which also wants a user name and password).

The load of ``bench ingest`` shares the machine's two cores with what it measures. Through
paho, every publish costs a message object with its own lock, a wake-up of paho's network
thread and a callback per PUBACK; the three publishers and the receipt listener took 0.45
of a core at 1,610 envelopes/s, half as much as both gateway workers (0.92), and the latency
measured was partly the load generator's. Here a publish is one ``send`` of a packet
built ahead (only its packet id changes) and acknowledgements are read in bulk.

Only what the benchmarks use is spoken: CONNECT (clean start, no will, a login if given),
PUBLISH at QoS 1 both ways, PUBACK, SUBSCRIBE, PINGREQ and DISCONNECT. Anything else from the
broker, and every refusal (a reason code of 0x80 or more), raises :class:`RawMqttError`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
# CONNACK property identifiers this client reads (MQTT 5.0, section 3.2.2.3).
_RECEIVE_MAXIMUM, _SERVER_KEEP_ALIVE = 0x21, 0x13
# Packet identifiers are 1..65535; a sender may reuse one once its PUBACK is back.
MAX_PACKET_ID = 65_535
_PROPERTY_SIZES = {  # fixed-size properties by identifier (section 2.2.2.2)
    0x01: 1, 0x02: 4, 0x11: 4, 0x13: 2, 0x17: 1, 0x19: 1, 0x21: 2, 0x22: 2, 0x23: 2,
    0x24: 1, 0x25: 1, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip
_STRING_PROPERTIES = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}  # length-prefixed
_KEEP_ALIVE_S = 60


class RawMqttError(RuntimeError):
    """The broker refused something, sent what this client does not speak, or went away."""


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (section 1.5.5)."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _read_varint(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(value, offset after it), or None when ``data`` ends inside it."""
    value = shift = 0
    for i in range(at, min(at + 4, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    if len(data) - at >= 4:
        raise RawMqttError("malformed remaining length from the broker")
    return None


def _properties(data: bytes, at: int) -> tuple[dict[int, int], int]:
    """The numeric properties of a property block at ``at`` (others skipped), and where the
    block ends."""
    read = _read_varint(data, at)
    if read is None:
        raise RawMqttError("truncated properties from the broker")
    length, at = read
    end, out = at + length, {}
    while at < end:
        ident = data[at]
        at += 1
        if ident in _PROPERTY_SIZES:
            size = _PROPERTY_SIZES[ident]
            out[ident] = int.from_bytes(data[at : at + size], "big")
            at += size
        elif ident in _STRING_PROPERTIES:
            at += 2 + int.from_bytes(data[at : at + 2], "big")
        elif ident == 0x26:  # user property: two strings
            for _ in range(2):
                at += 2 + int.from_bytes(data[at : at + 2], "big")
        elif ident == 0x0B:  # subscription identifier
            skipped = _read_varint(data, at)
            if skipped is None:
                raise RawMqttError("truncated properties from the broker")
            at = skipped[1]
        else:
            raise RawMqttError(f"unknown property 0x{ident:02x} from the broker")
    return out, end


@dataclass(frozen=True, slots=True)
class Login:
    """How a load generator logs in: MQTT 5 without credentials (Mosquitto in the loopback
    development mode), or, for RabbitMQ 3.10, MQTT 3.1.1 with a user name and password."""

    username: str | None = None
    password: str | None = None
    mqtt5: bool = True


class RawClient:
    """One MQTT connection; not thread-safe (one thread sends and reads)."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        timeout_s: float = 10.0,
        login: Login | None = None,
    ) -> None:
        self.login = login or Login()
        # MQTT 5 packets carry a property block where 3.1.1 has none.
        self._props = b"\x00" if self.login.mqtt5 else b""
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._inbox = bytearray()
        self._last_sent = time.monotonic()
        self.keep_alive_s = _KEEP_ALIVE_S
        flags = 0x02  # clean start
        credentials = b""
        if self.login.username is not None:
            flags |= 0x80
            credentials += _utf8(self.login.username)
            if self.login.password is not None:
                flags |= 0x40
                credentials += _utf8(self.login.password)
        body = (
            _utf8("MQTT")
            + bytes([5 if self.login.mqtt5 else 4, flags])
            + struct.pack("!H", self.keep_alive_s)
            + self._props
            + _utf8(client_id)
            + credentials
        )
        props: dict[int, int] = {}
        try:
            self._send(bytes([CONNECT]) + varint(len(body)) + body)
            kind, ack = self._next_packet(time.monotonic() + timeout_s)
            if kind != CONNACK:
                raise RawMqttError(f"expected CONNACK, got packet type 0x{kind:02x}")
            if len(ack) < 2:
                raise RawMqttError("malformed CONNACK from the broker")
            if self.login.mqtt5 and ack[1] >= 0x80:
                raise RawMqttError(f"connection refused, reason 0x{ack[1]:02x}")
            if not self.login.mqtt5 and ack[1] != 0:
                raise RawMqttError(f"connection refused, return code {ack[1]}")
            if self.login.mqtt5:
                props, _ = _properties(ack, 2)
        except BaseException:
            self._sock.close()  # a failed handshake leaves no socket open
            raise
        # How many QoS 1 publishes the broker takes unacknowledged (65,535 when it says not).
        self.receive_maximum = props.get(_RECEIVE_MAXIMUM, MAX_PACKET_ID)
        self.keep_alive_s = props.get(_SERVER_KEEP_ALIVE, self.keep_alive_s)

    # --- sending -------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)
        self._last_sent = time.monotonic()

    @staticmethod
    def topic_name(topic: str) -> bytes:
        """``topic`` as a PUBLISH carries it (build once, publish many times)."""
        return _utf8(topic)

    def publish(self, topic_name: bytes, payload: bytes, packet_id: int) -> None:
        """Send a QoS 1 PUBLISH (``topic_name`` from :meth:`topic_name`); its PUBACK comes
        back through :meth:`poll`."""
        if not 1 <= packet_id <= MAX_PACKET_ID:
            raise ValueError(f"packet id {packet_id} is not 1..{MAX_PACKET_ID}")
        length = len(topic_name) + 2 + len(self._props) + len(payload)
        self._send(
            b"".join(
                (
                    bytes([PUBLISH | 0x02]),
                    varint(length),
                    topic_name,
                    packet_id.to_bytes(2, "big"),
                    self._props,
                    payload,
                )
            )
        )

    def subscribe(self, topic_filter: str, packet_id: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        body = struct.pack("!H", packet_id) + self._props + _utf8(topic_filter) + b"\x01"
        self._send(bytes([SUBSCRIBE]) + varint(len(body)) + body)
        kind, ack = self._next_packet(time.monotonic() + timeout_s)
        if kind != SUBACK:
            raise RawMqttError(f"expected SUBACK, got packet type 0x{kind:02x}")
        at = _properties(ack, 2)[1] if self.login.mqtt5 else 2
        if at >= len(ack) or ack[at] >= 0x80:
            raise RawMqttError(f"subscription to {topic_filter!r} refused")

    def ping_if_idle(self) -> None:
        if time.monotonic() - self._last_sent > self.keep_alive_s / 2:
            self._send(bytes([PINGREQ, 0]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(bytes([DISCONNECT, 0]))
        self._sock.close()

    # --- reading -------------------------------------------------------------------------
    def _next_packet(self, deadline: float) -> tuple[int, bytes]:
        while True:
            for packet in self._packets():
                return packet
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                raise RawMqttError("no answer from the broker in time")

    def _fill(self, within_s: float) -> bool:
        """Read what the socket holds, waiting at most ``within_s``; False if nothing came."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, within_s))
        if not ready:
            return False
        data = self._sock.recv(1 << 16)
        if not data:
            raise RawMqttError("the broker closed the connection")
        self._inbox += data
        return True

    def _packets(self) -> Iterator[tuple[int, bytes]]:
        """Whole packets read so far, as (type with flags, body); consumed as yielded."""
        buf = self._inbox
        while len(buf) >= 2:
            read = _read_varint(buf, 1)
            if read is None:
                return
            length, start = read
            if len(buf) < start + length:
                return
            kind, body = buf[0], bytes(buf[start : start + length])
            del buf[: start + length]
            if kind == DISCONNECT:
                reason = body[0] if body else 0
                raise RawMqttError(f"the broker disconnected, reason 0x{reason:02x}")
            yield kind, body

    def poll(self, within_s: float) -> tuple[list[int], list[tuple[str, bytes]]]:
        """Wait up to ``within_s`` for traffic, then take all of it: the packet ids of the
        PUBACKs (a refusal raises) and the (topic, payload) of the publishes received, each
        acknowledged at once."""
        acked: list[int] = []
        received: list[tuple[str, bytes]] = []
        if not self._inbox and not self._fill(within_s):
            return acked, received
        while self._fill(0):  # what else is already there
            pass
        replies = bytearray()
        for kind, body in self._packets():
            packet = kind & 0xF0
            if packet == PUBACK:
                if len(body) > 2 and body[2] >= 0x80:
                    raise RawMqttError(f"publish refused, reason 0x{body[2]:02x}")
                acked.append(int.from_bytes(body[:2], "big"))
            elif packet == PUBLISH:
                qos = (kind >> 1) & 0x03
                n = int.from_bytes(body[:2], "big")
                topic, at = body[2 : 2 + n].decode(), 2 + n
                if qos:
                    replies += bytes([PUBACK, 2]) + body[at : at + 2]
                    at += 2
                if self.login.mqtt5:
                    _, at = _properties(body, at)
                received.append((topic, body[at:]))
            elif packet != PINGRESP:
                raise RawMqttError(f"unexpected packet type 0x{kind:02x} from the broker")
        if replies:
            self._send(bytes(replies))
        return acked, received
