"""The hub's relay: sealed envelopes from the outbox to the broker, receipts back.

Policy (the numbers are ``RelayConfig`` defaults):

- Seal when 100 readings are pending or the oldest pending one has waited 5 s. A 1 Hz heart
  rate stream then travels as an envelope every 5 s (about 0.2 messages/s per wearable), and
  a 100-record glucose backfill as one envelope: both well inside what one broker carries.
- Publish at QoS 1 with at most 20 envelopes in flight (sent, not yet receipted); every
  ``publish()`` return code is checked: an envelope counts as sent only when paho took it.
- An envelope without a receipt after 10 s (jittered +-20 %) is sent again, byte for byte;
  the gateway stores it once and receipts it again. Only a verified receipt (signed by the
  gateway key) removes an envelope from the outbox; a forged one is counted and ignored.
- paho reconnects on its own (1 s to 30 s backoff); the persistent session
  (``clean_start=False``, session expiry) keeps the receipt subscription across reconnects.
  A broker with several addresses (``alternates``: the nodes of a cluster) is reconnected at
  the next address whenever the connection is lost or cannot be made.
- When to seal and when to resend is timed on the monotonic clock, so a wall clock that
  jumps (either way) neither holds envelopes back nor floods the broker; the wall clock only
  stamps ``sent`` and the outbox's bookkeeping.

paho's callbacks only hand off to the event loop; the outbox (SQLite, synchronous) is called
on the hub's disk thread (``device_drivers.disk``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_drivers.disk import on_disk
from device_drivers.outbox import Outbox, OutboxError
from ingest.receipts import RECEIPT_REJECTED, open_receipt
from ingest.topics import down_topic, up_topic
from ingest.transport import connect_async, make_client, stop_client
from ingest.wire import EnvelopeError

log = logging.getLogger(__name__)

# Receipts waiting to be applied; bounded by what is in flight. One that finds the queue
# full is counted and dropped: its envelope is sent again and receipted again.
RECEIPT_QUEUE = 1000
SESSION_EXPIRY_S = 7 * 86_400
# paho doubles its reconnect delay from min to max but adds no jitter: each hub draws its
# own bounds, so thousands of hubs do not come back in step after a broker restart.
RECONNECT_MIN_S = (1, 4)
RECONNECT_MAX_S = (20, 40)
# After a failed seal (a full disk frees up in minutes, not milliseconds) wait this long
# before trying again, so the log gets one line per attempt, not five a second.
SEAL_RETRY_S = 5.0


@dataclass(frozen=True, slots=True)
class RelayConfig:
    device_id: str
    host: str
    port: int
    seal_max_readings: int = 100
    seal_max_age_s: float = 5.0
    resend_after_s: float = 10.0
    max_inflight: int = 20
    tick_s: float = 0.2
    keepalive_s: int = 30
    mqtt5: bool = True
    # Other addresses of the same broker (the nodes of a RabbitMQ cluster): when the
    # connection is lost or cannot be made, the next address is tried (round after round).
    alternates: tuple[tuple[str, int], ...] = ()


@dataclass
class RelayStats:
    sent: int = 0
    resent: int = 0
    publish_refused: int = 0
    receipts_accepted: int = 0
    receipts_rejected: int = 0
    receipts_ignored: int = 0
    # A receipt for an envelope already receipted (it was resent before the first arrived).
    receipts_repeated: int = 0
    # Outbox writes that failed (a full disk, an I/O error): retried on the next tick.
    outbox_errors: int = 0
    connected: bool = False
    # Attempts to connect that failed since the last one that succeeded (a refused TLS
    # handshake, a broker that cannot be reached, a refused CONNECT): after a few, the hub
    # asks the gateway whether it is still in good standing (device_drivers/credentials.py).
    connect_failures: int = 0


class Relay:
    def __init__(
        self,
        config: RelayConfig,
        outbox: Outbox,
        key: ec.EllipticCurvePrivateKey,
        gateway_key: ec.EllipticCurvePublicKey,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        configure_client: Callable[[mqtt.Client], None] | None = None,
    ) -> None:
        self.config = config
        self.stats = RelayStats()
        self._outbox = outbox
        self._key = key
        self._gateway_key = gateway_key
        self._clock = clock
        self._monotonic = monotonic
        self._receipts: asyncio.Queue[bytes] = asyncio.Queue(maxsize=RECEIPT_QUEUE)
        # seq -> monotonic time of its last send, for envelopes not yet due for a resend.
        self._inflight: dict[int, float] = {}
        self._last_seal = monotonic()
        self._seal_retry_at = 0.0
        self._online = True
        self._brokers = [(config.host, config.port), *config.alternates]
        self._broker = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = make_client(config.device_id, mqtt5=config.mqtt5)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(
            random.randint(*RECONNECT_MIN_S),  # noqa: S311 - jitter, not secrets
            random.randint(*RECONNECT_MAX_S),  # noqa: S311
        )
        if configure_client is not None:
            configure_client(self._client)

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
            self.stats.connect_failures += 1
            log.error("broker refused the hub device=%s reason=%s", self.config.device_id, reason)
            return
        self.stats.connect_failures = 0
        self.stats.connected = True
        client.subscribe(down_topic(self.config.device_id), qos=1)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self.stats.connect_failures += 1
        self._next_broker(client)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self.stats.connected:
            # Lost before the broker's CONNACK: with TLS 1.3 a broker refuses a client
            # certificate (revoked, expired) only after the handshake has completed on the
            # hub's side, so the refusal arrives as a lost connection, not a failed connect.
            self.stats.connect_failures += 1
        self.stats.connected = False
        if reason.is_failure:  # lost, not a disconnect the hub asked for
            self._next_broker(client)

    @property
    def broker(self) -> tuple[str, int]:
        """The broker address it is connected to, or trying next."""
        return self._brokers[self._broker]

    def _next_broker(self, client: mqtt.Client) -> None:
        """Aim paho's next reconnect at the broker's next address, if it has others."""
        if len(self._brokers) < 2 or not self._online:
            return
        self._broker = (self._broker + 1) % len(self._brokers)
        host, port = self._brokers[self._broker]
        log.info("relay trying the broker's next address %s:%d", host, port)
        self._connect_async(host, port)

    def _connect_async(self, host: str, port: int) -> None:
        connect_async(
            self._client,
            host,
            port,
            keepalive=self.config.keepalive_s,
            mqtt5=self.config.mqtt5,
            session_expiry_s=SESSION_EXPIRY_S,
        )

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._enqueue_receipt, bytes(msg.payload))

    def _enqueue_receipt(self, data: bytes) -> None:
        try:
            self._receipts.put_nowait(data)
        except asyncio.QueueFull:
            self.stats.receipts_ignored += 1
            log.warning("receipt queue full, receipt dropped (envelope will be resent)")

    # --- event loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Relay until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._connect_async(*self._brokers[self._broker])
        self._client.loop_start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send_loop(), name=f"relay-send-{self.config.device_id}")
                tg.create_task(self._receipt_loop(), name=f"relay-receipts-{self.config.device_id}")
        finally:
            stop_client(self._client)

    async def set_online(self, online: bool) -> None:
        """Drop or restore the network connection: a hub losing its Wi-Fi and getting it back.

        Offline, the hub keeps sealing into its outbox and sends nothing; back online, it
        reconnects to its persistent session and relays the backlog.
        """
        if online == self._online:
            return
        self._online = online
        if online:
            self._connect_async(*self._brokers[self._broker])
            self._client.loop_start()
        else:
            self._client.disconnect()
            await asyncio.to_thread(self._client.loop_stop)
            self.stats.connected = False
            self._inflight.clear()

    async def _send_loop(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.config.tick_s)

    async def tick(self) -> None:
        """One round: seal what is due for sealing, then (re)send what is due for sending."""
        now = self._clock()
        mono = self._monotonic()
        stats = await on_disk(self._outbox.stats)
        if stats.pending_readings or stats.pending_gaps or stats.time_zone_pending:
            full = stats.pending_readings >= self.config.seal_max_readings
            aged = mono - self._last_seal >= self.config.seal_max_age_s
            if (full or aged) and mono >= self._seal_retry_at:
                try:
                    await on_disk(
                        self._outbox.seal_pending,
                        self._key,
                        int(now * 1000),
                        self.config.seal_max_readings,
                    )
                except OutboxError as exc:
                    # Nothing changed (sealing is one transaction): the readings stay pending
                    # and are tried again after SEAL_RETRY_S; what is sealed is still sent.
                    self.stats.outbox_errors += 1
                    self._seal_retry_at = mono + SEAL_RETRY_S
                    log.error(
                        "sealing failed device=%s error=%s",
                        self.config.device_id,
                        type(exc).__name__,
                    )
                else:
                    self._last_seal = mono
        else:
            self._last_seal = mono
        if not self.stats.connected:
            return
        resend_after = self.config.resend_after_s * random.uniform(0.8, 1.2)  # noqa: S311
        self._inflight = {s: t for s, t in self._inflight.items() if mono - t < resend_after}
        room = self.config.max_inflight - len(self._inflight)
        if room <= 0:
            return
        # The outbox's own filter (by the wall clock it recorded) finds what waits; what this
        # relay sent within resend_after (by the monotonic clock) is skipped.
        due = await on_disk(
            self._outbox.due, int(now * 1000), int(resend_after * 1000), room + len(self._inflight)
        )
        for env in (e for e in due if e.seq not in self._inflight):
            if room <= 0:
                break
            info = self._client.publish(up_topic(self.config.device_id), env.data, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.stats.publish_refused += 1
                log.warning(
                    "publish refused device=%s seq=%d rc=%s",
                    self.config.device_id,
                    env.seq,
                    info.rc,
                )
                break
            # The publish has happened: it is counted before the bookkeeping awaits, so a
            # relay stopped during that await still accounts for what it put on the wire.
            self._inflight[env.seq] = mono
            room -= 1
            if env.attempts:
                self.stats.resent += 1
            else:
                self.stats.sent += 1
            try:
                await on_disk(self._outbox.mark_sent, env.seq, int(now * 1000))
            except OutboxError as exc:
                # Only the bookkeeping of the send is missing: it is sent again later.
                self.stats.outbox_errors += 1
                log.error(
                    "send not recorded device=%s seq=%d error=%s",
                    self.config.device_id,
                    env.seq,
                    type(exc).__name__,
                )

    async def _receipt_loop(self) -> None:
        while True:
            data = await self._receipts.get()
            await self.apply_receipt(data)

    async def apply_receipt(self, data: bytes) -> None:
        try:
            receipt = open_receipt(data, self._gateway_key)
        except EnvelopeError as exc:
            self.stats.receipts_ignored += 1
            log.warning("receipt ignored device=%s: %s", self.config.device_id, exc)
            return
        if receipt.dev != self.config.device_id:
            self.stats.receipts_ignored += 1
            log.warning("receipt for another device ignored device=%s", self.config.device_id)
            return
        try:
            applied = await on_disk(self._outbox.receipt, receipt)
        except OutboxError as exc:
            self.stats.receipts_ignored += 1
            log.warning("receipt not applied device=%s: %s", self.config.device_id, exc)
            return
        self._inflight.pop(receipt.seq, None)
        if not applied:
            self.stats.receipts_repeated += 1
            return
        if receipt.status == RECEIPT_REJECTED:
            self.stats.receipts_rejected += 1
            log.warning(
                "envelope rejected by the gateway device=%s seq=%d reason=%s",
                self.config.device_id,
                receipt.seq,
                receipt.reason,
            )
        else:
            self.stats.receipts_accepted += 1
