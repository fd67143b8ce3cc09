"""How hub and gateway reach the broker: TLS with client certificates (MQTT over TLS 1.2+).

Only configuration lives here, shared by both sides; connecting is theirs to do.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A certificate, its private key, and the CA certificate that verifies the peer."""

    cafile: Path
    certfile: Path
    keyfile: Path


class ClientTls:
    """Configures a paho client to present ``files`` and verify the broker (TLS 1.2+).

    One TLS context per client, kept here: ``reload()`` reads the certificate and key again
    (a hub that renewed its certificate), and every handshake from then on presents the new
    one; the connection already open is left as it is.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies peer and host name
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_verify_locations(cafile=str(files.cafile))
        self.reload()

    def reload(self) -> None:
        self.context.load_cert_chain(
            certfile=str(self.files.certfile), keyfile=str(self.files.keyfile)
        )

    def __call__(self, client: mqtt.Client) -> None:
        client.tls_set_context(self.context)


def configure_tls(files: TlsFiles | None) -> ClientTls | None:
    """A client configurator presenting ``files`` and verifying the broker, or None."""
    return None if files is None else ClientTls(files)


def make_client(client_id: str, *, mqtt5: bool = True, manual_ack: bool = False) -> mqtt.Client:
    """A paho client with a persistent session: MQTT 5, or 3.1.1 for brokers without it.

    The session survives disconnects (3.1.1: ``clean_session=False``; 5: ``clean_start=False``
    with an expiry given at connect), so QoS 1 messages in either direction are not lost
    while a hub or a gateway worker is away.
    """
    if mqtt5:
        return mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=False,
        manual_ack=manual_ack,
    )


def connect_async(
    client: mqtt.Client,
    host: str,
    port: int,
    *,
    keepalive: int,
    mqtt5: bool,
    session_expiry_s: int,
    receive_maximum: int | None = None,
) -> None:
    """Start connecting (paho's loop thread completes it and reconnects on its own)."""
    if not mqtt5:
        client.connect_async(host, port, keepalive=keepalive)
        return
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    client.connect_async(host, port, keepalive=keepalive, clean_start=False, properties=props)


def stop_client(client: mqtt.Client) -> None:
    """Disconnect ``client``, stop its network thread and release its sockets now. paho
    closes them, the socket pair that wakes its loop included, only when the client object is
    collected (eclipse-paho/paho.mqtt.python issue 627): a process that replaces clients
    would otherwise leave descriptors to the garbage collector.

    paho's ``loop_stop`` reads its network thread twice, and the thread, ending after the
    disconnect, clears it in between (issue 872): ``'NoneType' object has no attribute
    'join'``. The thread is taken before the disconnect and joined here."""
    thread = client._thread  # paho has no public handle on it
    client.disconnect()
    with contextlib.suppress(AttributeError):
        client.loop_stop()
    if thread is not None and thread is not threading.current_thread():
        thread.join()
    client._reset_sockets()  # paho has no public close
