"""The MQTT consumer: the broker's side of ``gateway.consumer_core`` on paho-mqtt.

paho runs its network loop in its own thread; ``on_message`` only hands the message to the
event loop. The client is built with ``manual_ack=True`` and the broker's sessions are kept
(stable client id, ``clean_start=False``, a session expiry), so a message is acknowledged to
the broker only after the batch that holds it is committed, and a worker that dies gets its
unacknowledged messages back when it reconnects.

Back-pressure: at most ``MAX_UNACKED`` messages are held in memory between their arrival and
their acknowledgement. The CONNECT packet's Receive Maximum asks the broker for the same cap,
but Mosquitto 2.0.11 does not keep to it once acknowledgements flow (measured: 30 000
unacknowledged deliveries against a Receive Maximum of 2000), so the cap is also enforced
here: ``on_message`` waits for a free slot, which stops paho reading the socket, and TCP flow
control holds the rest at the broker. While the database is down nothing is acknowledged, so
memory stays bounded by the cap; an outage longer than the keepalive costs a reconnect, after
which the broker delivers the unacknowledged messages again (stored once: the dedupe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from psycopg_pool import AsyncConnectionPool

from gateway.consumer_core import (
    ALONE_AFTER,
    EARLY_CHUNK,
    KNOWN_KEYS_MAX,
    MAX_UNACKED,
    MAX_UNACKED_BYTES,
    BatchConsumer,
    ConsumerConfig,
    Histogram,
    Stats,
)
from gateway.judging import Message
from ingest import pipeline
from ingest.model import Receipt
from ingest.transport import connect_async, make_client, stop_client
from storage.writer import BulkWriter, InTransaction

__all__ = [
    "ALONE_AFTER",
    "EARLY_CHUNK",
    "KNOWN_KEYS_MAX",
    "MAX_UNACKED",
    "MAX_UNACKED_BYTES",
    "Consumer",
    "ConsumerConfig",
    "Histogram",
    "Stats",
]

log = logging.getLogger(__name__)

SHARED_SUBSCRIPTION = "$share/ingest/dct/v1/+/up"
PLAIN_SUBSCRIPTION = "dct/v1/+/up"
# Unacknowledged messages the broker may hand one worker: a few batches' worth, so the
# batcher always has work while the previous batch commits, and memory stays bounded.
RECEIVE_MAXIMUM = MAX_UNACKED
# Publishes (receipts, alert events) a worker's publishing connection may hold
# unacknowledged by the broker. paho keeps them in memory without a bound by default. Past
# the bound paho refuses the publish: the envelope is stored, and its hub gets the receipt
# when it republishes (an alert event stays in the outbox and is sent again).
MAX_QUEUED_PUBLISHES = 2000
# How often a paho thread waiting for a slot checks whether the consumer is stopping.
_SLOT_POLL_S = 0.5
# A worker's broker session outlives a crash or restart by this long (seconds).
SESSION_EXPIRY_S = 14 * 86_400


class Consumer(BatchConsumer):
    """The consumer on an MQTT 5 broker (Mosquitto): a shared subscription, paho's thread."""

    def __init__(
        self,
        config: ConsumerConfig,
        pool: AsyncConnectionPool,
        writer: BulkWriter,
        receipt_key: ec.EllipticCurvePrivateKey,
        *,
        clock: Callable[[], float] = time.time,
        configure_client: Callable[[mqtt.Client], None] | None = None,
        also: InTransaction | None = None,
    ) -> None:
        super().__init__(config, pool, writer, receipt_key, clock=clock, also=also)
        # One per message until it is acknowledged: paho's thread waits for one.
        self._slots = threading.BoundedSemaphore(MAX_UNACKED)
        self._build_transport(configure_client)

    def _build_transport(self, configure_client: Callable[[mqtt.Client], None] | None) -> None:
        config = self.config
        self._client = make_client(config.client_id, mqtt5=config.mqtt5, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        # Receipts and alert events go out on a connection of their own. On the consuming
        # one, paho's network thread waits in on_message whenever MAX_UNACKED messages are
        # held, and then reads no PUBACK either: with the database slowed and a backlog at
        # the broker, its receipts were acknowledged about 14 a second, and queued (measured:
        # 14,470 in paho's memory after 75 s, growing) or, once bounded, refused (99% of
        # them over 10 minutes).
        self._out = publisher_client(f"{config.client_id}-out", mqtt5=config.mqtt5)
        for client in (self._client, self._out):
            client.reconnect_delay_set(1, 10)
            if configure_client is not None:
                configure_client(client)

    # --- paho thread: hand off only --------------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("mqtt connect refused reason=%s", reason)
            return
        self.stats.mqtt_connected = True
        topic = SHARED_SUBSCRIPTION if self.config.shared else PLAIN_SUBSCRIPTION
        client.subscribe(topic, qos=1)
        log.info("mqtt connected client_id=%s subscribed=%s", self.config.client_id, topic)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error("mqtt subscription refused reasons=%s", reasons)
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._subscribed.set)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.stats.mqtt_connected = False
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._subscribed.clear)
        log.warning("mqtt disconnected reason=%s", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # Blocks paho's network thread while MAX_UNACKED messages or MAX_UNACKED_BYTES wait:
        # back-pressure by TCP. Once stopping, every message is let go at once (not
        # acknowledged: the broker delivers it again to this session), or a backlog in the
        # socket would hold the shutdown for _SLOT_POLL_S per message.
        payload = bytes(msg.payload)
        while self._stopping.is_set() or not self._slots.acquire(timeout=_SLOT_POLL_S):
            if self._stopping.is_set():
                return
        while not self._bytes.take(len(payload), _SLOT_POLL_S):
            if self._stopping.is_set():
                self._slots.release()
                return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # Refused at decode as not an uplink topic; an exception here would end paho's
            # network thread, and with it every delivery to this worker.
            topic = bytes(msg._topic).decode("utf-8", "backslashreplace")
        self._inbox.put(Message(topic, payload, msg.mid, msg.qos, self._now_ms(), bool(msg.dup)))

    async def _open_transport(self) -> None:
        """Connect to the broker; messages then arrive in the inbox."""
        assert self._client is not None
        assert self._out is not None
        # Only the consuming connection asks the broker for a cap on what it is sent.
        for client, receive_maximum in ((self._client, RECEIVE_MAXIMUM), (self._out, None)):
            connect_async(
                client,
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_s,
                mqtt5=self.config.mqtt5,
                session_expiry_s=SESSION_EXPIRY_S,
                receive_maximum=receive_maximum,
            )
            client.loop_start()

    async def _close_transport(self) -> None:
        assert self._client is not None
        assert self._out is not None
        stop_client(self._client)
        stop_client(self._out)

    async def _ack(self, m: Message) -> None:
        """Acknowledge a handled message to the broker (after its batch committed)."""
        assert self._client is not None
        self._client.ack(m.mid, m.qos)
        self._bytes.give(len(m.payload))
        self._slots.release()

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        """Publish with QoS 1 on this worker's publishing connection (alert events)."""
        assert self._out is not None
        return self._out.publish(topic, payload, qos=1)

    async def _publish_receipt(self, receipt: Receipt, data: bytes) -> None:
        assert self._out is not None
        info = self._out.publish(pipeline.down_topic(receipt.dev), data, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # The envelope is stored; the hub will republish it and get the receipt again.
            self.stats.receipt_publish_failures += 1
            log.warning(
                "receipt not published device=%s seq=%d rc=%s", receipt.dev, receipt.seq, info.rc
            )


def publisher_client(client_id: str, *, mqtt5: bool) -> mqtt.Client:
    """A worker's publishing connection: publishes bounded in memory."""
    client = make_client(client_id, mqtt5=mqtt5)
    client.max_queued_messages_set(MAX_QUEUED_PUBLISHES)
    return client
