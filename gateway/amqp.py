"""The gateway fed from RabbitMQ over AMQP instead of MQTT (docs/scaling.md).

Hubs keep speaking MQTT (3.1.1) to RabbitMQ's MQTT plugin, which publishes each envelope on
``amq.topic`` with the topic as routing key (``dct/v1/<device>/up`` becomes
``dct.v1.<device>.up``). A durable quorum queue (``UPLINK_QUEUE``, replicated across the
cluster's nodes) bound with ``dct.v1.#.up`` holds them until a gateway worker acknowledges
each, after the batch that holds it committed: the same pipeline, the same exactly-once writer
and the same receipts as the MQTT consumer (``gateway.consumer_core``), only the broker's side
differs.

- Delivery: one channel with a prefetch of ``MAX_UNACKED`` messages (RabbitMQ keeps to it),
  and the same byte budget as the MQTT consumer. A message the broker delivers again
  (``redelivered``: a worker stopped while holding it) is the MQTT consumer's DUP.
- Sharding (``TRIALSTREAM_AMQP_SHARDS``): the uplink may be N quorum queues behind a
  consistent-hash exchange on the routing key (``declare_uplink``), so that a hub's envelopes
  stay in one queue, in order; a worker consumes all N on its one channel.
- Acknowledgement: a committed batch that holds every message the channel delivered and
  nobody acknowledged, up to some delivery tag, is acknowledged with one ``multiple`` ack
  at that tag (``ack_plan``); the rest of the batch one by one. The dead-letter queue is
  consumed on a channel of its own, so that its tags never fall under such an ack.
- A message delivered ``DELIVERY_LIMIT`` times goes to the dead-letter queue
  (``trialstream.uplink.dead``) instead of circulating: the consumer refuses one as poison
  well before that (``gateway.storing.POISON_AFTER``), with a rejection row; a quorum queue
  counts a worker's crash as a delivery too, so the limit leaves room for restarts. Every
  worker also takes the dead-letter queue: each dead letter leaves a ``poison`` rejection row
  (unread) before it is acknowledged, so nothing leaves the system without a row.
- Receipts go back on ``amq.topic`` with the hub's ``down`` topic as routing key, which the
  MQTT plugin hands to the hub's subscription; alert events likewise, with publisher
  confirms.
- Failover: the worker holds one plain connection to one node of its list
  (``TRIALSTREAM_AMQP_URLS``). When that connection or its channel is lost it takes the next
  node of the list that answers, declares, and consumes again; messages it held unacknowledged
  come back from the queue as redelivered, stored once and receipted as replays.
  (aio-pika's robust connection reconnects to the one node it first reached, never to another.)
- The queue is declared (idempotently) by every worker before it consumes: RabbitMQ's MQTT
  plugin acknowledges a QoS 1 publish that no queue takes and drops it, so the queue must
  exist before hubs publish (``declare_uplink``, also run by the deploy step).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg_pool import AsyncConnectionPool

from gateway.consumer_core import MAX_UNACKED, BatchConsumer, ConsumerConfig
from gateway.judging import Message
from gateway.rabbitmq import TOPIC_EXCHANGE
from ingest import pipeline
from ingest.model import Batch, Reason, Receipt, RejectedEnvelope
from storage.errors import StorageError
from storage.writer import BulkWriter, InTransaction

log = logging.getLogger(__name__)

UPLINK_QUEUE: Final = "trialstream.uplink"
UPLINK_BINDING: Final = "dct.v1.#.up"
DELIVERY_LIMIT: Final = 20
CONNECT_TIMEOUT_S: Final = 10.0
# After a node is lost, the next is tried at once; a round of the whole list that finds none
# waits this long, doubling up to the cap, before the next round.
RECONNECT_S: Final = (1.0, 10.0)
# A dead letter whose row could not be written is handed back and tried again after this.
RETRY_S: Final = 5.0
# Dead letters are few: this many are held unacknowledged at a time.
DEAD_PREFETCH: Final = 100
# A message's id: its connection's generation above its delivery tag.
TAG_BITS: Final = 48
# Sharding (``TRIALSTREAM_AMQP_SHARDS``): the exchange type of RabbitMQ's
# rabbitmq_consistent_hash_exchange plugin, and each shard queue's weight in its ring.
MAX_SHARDS: Final = 16
HASH_EXCHANGE_TYPE: Final = "x-consistent-hash"
SHARD_WEIGHT: Final = "1"


def routing_key(topic: str) -> str:
    """The AMQP routing key of an MQTT topic, as RabbitMQ's MQTT plugin makes it."""
    return topic.replace("/", ".")


def uplink_topic(key: str) -> str:
    """The hub's MQTT topic of an uplink routing key. A device id may hold dots, which the
    plugin cannot tell from separators: the id is what lies between the prefix and ``.up``."""
    prefix, suffix = routing_key(pipeline.TOPIC_PREFIX), routing_key(pipeline.UP_SUFFIX)
    if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix + suffix):
        return pipeline.TOPIC_PREFIX + key[len(prefix) : -len(suffix)] + pipeline.UP_SUFFIX
    return key  # not an uplink: refused at decode as not an uplink topic


def dead_letter_queue(name: str) -> str:
    """The dead-letter queue of the uplink queue ``name``."""
    return f"{name}.dead"


def shard_queues(name: str, shards: int) -> list[str]:
    """The uplink's queues: ``name`` alone, or ``name.0`` .. ``name.<shards-1>``."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"an uplink has 1 to {MAX_SHARDS} queues, not {shards}")
    return [name] if shards == 1 else [f"{name}.{i}" for i in range(shards)]


def shard_exchange(name: str) -> str:
    """The consistent-hash exchange in front of the sharded uplink ``name``'s queues."""
    return f"{name}.hash"


async def declare_uplink(
    channel: AbstractChannel, name: str = UPLINK_QUEUE, shards: int = 1
) -> list[AbstractQueue]:
    """The uplink quorum queue (or ``shards`` of them) and its dead-letter queue. One queue
    is bound on ``amq.topic``; shards are bound on a consistent-hash exchange that is bound
    on ``amq.topic``: each routing key (each hub) hashes to one queue, so a hub's envelopes
    keep their order, and each shard's leader is placed on the least loaded node."""
    names = shard_queues(name, shards)
    dead = dead_letter_queue(name)
    await channel.declare_queue(dead, durable=True, arguments={"x-queue-type": "quorum"})
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead,
    }
    if shards == 1:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await queue.bind(TOPIC_EXCHANGE, routing_key=UPLINK_BINDING)
        return [queue]
    hashing = await channel.declare_exchange(shard_exchange(name), HASH_EXCHANGE_TYPE, durable=True)
    await hashing.bind(TOPIC_EXCHANGE, routing_key=UPLINK_BINDING)
    queues: list[AbstractQueue] = []
    for shard in names:
        queue = await channel.declare_queue(
            shard, durable=True, arguments={**arguments, "x-queue-leader-locator": "balanced"}
        )
        await queue.bind(hashing, routing_key=SHARD_WEIGHT)
        queues.append(queue)
    return queues


class AmqpConsumer(BatchConsumer):
    """The consumer's pipeline with RabbitMQ's uplink queue as its source."""

    def __init__(
        self,
        config: ConsumerConfig,
        urls: Sequence[str],
        pool: AsyncConnectionPool,
        writer: BulkWriter,
        receipt_key: ec.EllipticCurvePrivateKey,
        *,
        queue: str = UPLINK_QUEUE,
        shards: int = 1,
        clock: Callable[[], float] = time.time,
        also: InTransaction | None = None,
    ) -> None:
        if not urls:
            raise ValueError("an AMQP consumer needs at least one node's URL")
        shard_queues(queue, shards)  # in bounds
        self._urls = list(urls)
        self._next_url = 0
        self._queue_name = queue
        self._shards = shards
        # Delivered, in delivery order, not yet in the inbox (waiting for the byte budget).
        self._arrived: asyncio.Queue[tuple[int, AbstractIncomingMessage]] = asyncio.Queue()
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._burying: asyncio.Task[None] | None = None
        self._supervising: asyncio.Task[None] | None = None
        # Each connection's delivery tags start again at 1: a message's id is the
        # connection's generation and its tag, so a late ack never hits a newer message.
        self._generation = 0
        # In delivery order: the oldest unacknowledged messages come first (``ack_plan``).
        self._held: OrderedDict[int, AbstractIncomingMessage] = OrderedDict()
        self._lost = asyncio.Event()
        super().__init__(config, pool, writer, receipt_key, clock=clock, also=also)

    @property
    def node_url(self) -> str | None:
        """The URL of the node this worker consumes from now (None while it has none)."""
        return str(self._connection) if self._connection is not None else None

    async def _open_transport(self) -> None:
        # The first node must answer at start (a worker that cannot reach any node says so);
        # later losses are the supervisor's.
        connection = await self._connect_next()
        try:
            await self._attach(connection)
        except BaseException:
            await self._detach()
            raise
        self._supervising = asyncio.create_task(self._supervise(), name="amqp-supervise")

    async def _connect_next(self) -> AbstractConnection:
        """The next node of the list that answers, starting after the one last used."""
        errors: list[str] = []
        for _ in self._urls:
            url = self._urls[self._next_url % len(self._urls)]
            self._next_url += 1
            try:
                return await aio_pika.connect(url, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        raise ConnectionError(f"no RabbitMQ node answered: {'; '.join(errors)[:500]}")

    async def _attach(self, connection: AbstractConnection) -> None:
        """Consume the uplink's queues and the dead-letter queue over ``connection``."""
        self._connection = connection
        self._generation += 1
        generation = self._generation
        channel = await connection.channel(publisher_confirms=True)
        # Per consumer (quorum queues have no channel-wide prefetch): the shards share it.
        await channel.set_qos(prefetch_count=max(1, MAX_UNACKED // self._shards))
        queues = await declare_uplink(channel, self._queue_name, self._shards)
        dead_channel = await connection.channel(publisher_confirms=False)
        await dead_channel.set_qos(prefetch_count=DEAD_PREFETCH)
        dead = await dead_channel.get_queue(dead_letter_queue(self._queue_name))
        self._exchange = await channel.get_exchange(TOPIC_EXCHANGE)

        async def arrived(message: AbstractIncomingMessage) -> None:
            # aio-pika runs each delivery's callback as a task of its own, in the order the
            # channel delivered them: held in delivery-tag order, whichever queue it came
            # from, before anything awaits (``ack_plan`` relies on it).
            tag = message.delivery_tag
            assert tag is not None, "a consumed message has a delivery tag"
            mid = generation << TAG_BITS | tag
            self._held[mid] = message
            self._arrived.put_nowait((mid, message))

        # Lost with its connection (``_until_lost``), or alone: the channel closed by the
        # broker, or a queue's consumer cancelled by it (the queue deleted).
        lost = self._lost = asyncio.Event()
        channel.close_callbacks.add(lambda *_: lost.set())
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(lambda *_: lost.set())
        self._delivering = asyncio.create_task(self._deliver(), name="amqp-deliver")
        for queue in queues:
            await queue.consume(arrived)
        self._burying = asyncio.create_task(self._bury(dead), name="amqp-dead-letters")
        self.stats.mqtt_connected = True
        self._subscribed.set()
        log.info(
            "amqp consuming queues=%s node=%s",
            ",".join(q.name for q in queues),
            connection,
        )

    async def _supervise(self) -> None:
        """Wait for the connection (or its channel, or its consumer) to be lost; then take
        the next node that answers, round after round with a growing pause, and consume."""
        while True:
            await self._until_lost()
            await self._detach()
            pause = RECONNECT_S[0]
            while True:
                try:
                    connection = await self._connect_next()
                    await self._attach(connection)
                    break
                except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
                    log.warning("amqp no node to consume from error=%s", exc)
                    await self._detach()
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, RECONNECT_S[1])

    async def _until_lost(self) -> None:
        """Return when the connection closes, its channel closes, the broker cancels one of
        its consumers, or a consuming task ends."""
        connection = self._connection
        assert connection is not None
        lost = self._lost
        connection.close_callbacks.add(lambda *_: lost.set())
        if connection.is_closed:
            lost.set()
        watched = [t for t in (self._delivering, self._burying) if t is not None]
        waiting = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait([waiting, *watched], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        log.warning("amqp connection lost node=%s; trying the next node", connection)

    async def _detach(self) -> None:
        """Stop consuming over the current connection and close what is left of it. The
        messages it delivered and nobody acknowledged go back to the queue."""
        self.stats.mqtt_connected = False
        self._exchange = None
        for task in (self._delivering, self._burying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._delivering = self._burying = None
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        # Delivered but never handed on: the broker gives them to a consumer again.
        while not self._arrived.empty():
            mid, _ = self._arrived.get_nowait()
            self._held.pop(mid, None)

    async def _deliver(self) -> None:
        """Into the inbox, in delivery order, each message the byte budget has room for."""
        while True:
            mid, message = await self._arrived.get()
            if mid >> TAG_BITS != self._generation:
                self._held.pop(mid, None)  # from a connection since lost: delivered again
                continue
            payload = message.body
            # Room at once, as a rule; else wait for acknowledgements in a thread (the
            # budget is shared with the threads of the MQTT consumer's design).
            if not self._bytes.take(len(payload), 0):
                while not await asyncio.to_thread(self._bytes.take, len(payload), 1.0):
                    pass
            self._inbox.put(
                Message(
                    uplink_topic(message.routing_key or ""),
                    payload,
                    mid,
                    1,
                    self._now_ms(),
                    bool(message.redelivered),
                )
            )

    async def _bury(self, dead: AbstractQueue) -> None:
        """A rejection row for each message RabbitMQ dead-lettered, then its acknowledgement
        (not before the row is committed: a worker that stops first leaves it queued)."""
        async with dead.iterator() as messages:
            async for message in messages:
                topic, why = _death(message)
                refused = RejectedEnvelope(
                    Reason.POISON,
                    f"dead-lettered by RabbitMQ ({why}, limit {DELIVERY_LIMIT}); not read",
                    topic,
                    hashlib.sha256(message.body).digest(),
                    dev=pipeline.topic_device(topic),
                )
                try:
                    await self._writer.write(Batch((), (refused,), self._now_ms()))
                except StorageError as exc:
                    log.warning("dead letter not recorded; kept error=%s", exc)
                    await message.nack(requeue=True)
                    await asyncio.sleep(RETRY_S)
                    continue
                self.stats.rejected_envelopes[Reason.POISON.value] += 1
                await message.ack()

    async def _close_transport(self) -> None:
        if self._supervising is not None:
            self._supervising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervising
        await self._detach()

    async def _ack(self, m: Message) -> None:
        await self._ack_all([m])

    async def _ack_all(self, handled: list[Message]) -> None:
        for m in handled:
            self._bytes.give(len(m.payload))
        covered, each = ack_plan(self._held, [m.mid for m in handled], self._generation)
        if covered:
            for mid in covered:
                message = self._held.pop(mid)
            await self._send_ack(covered[-1], message, multiple=True)
        for mid in each:
            await self._send_ack(mid, self._held.pop(mid), multiple=False)

    async def _send_ack(
        self, mid: int, message: AbstractIncomingMessage, *, multiple: bool
    ) -> None:
        try:
            await message.ack(multiple=multiple)
        except (aio_pika.exceptions.AMQPError, RuntimeError) as exc:
            # The channel was replaced since delivery: the broker delivers the message again
            # (redelivered), and its envelope, stored once, is receipted as a replay.
            log.warning("ack not delivered mid=%d error=%s", mid, type(exc).__name__)

    async def publish_confirmed(self, topic: str, payload: bytes) -> bool:
        """Publish on ``amq.topic`` and wait for the broker's confirm (alert events)."""
        if self._exchange is None:
            return False
        try:
            await self._exchange.publish(
                aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=routing_key(topic),
            )
        except (aio_pika.exceptions.AMQPError, RuntimeError, OSError) as exc:
            log.warning("publish not confirmed topic=%s error=%s", topic, type(exc).__name__)
            return False
        return True

    async def _publish_receipts(self, receipts: list[tuple[Receipt, bytes]]) -> None:
        """All of a batch's receipts in flight at once, each confirmed by the broker: one
        round trip per batch, not one per receipt."""
        confirmed = await asyncio.gather(
            *(self.publish_confirmed(pipeline.down_topic(r.dev), data) for r, data in receipts)
        )
        # An envelope whose receipt was not confirmed is stored; its hub will publish it
        # again and get the receipt then.
        self.stats.receipt_publish_failures += confirmed.count(False)

    async def _publish_receipt(self, receipt: Receipt, data: bytes) -> None:
        await self._publish_receipts([(receipt, data)])


def ack_plan(
    held: Mapping[int, object], handled: Sequence[int], generation: int
) -> tuple[list[int], list[int]]:
    """How to acknowledge the messages ``handled`` among those ``held`` (ids in delivery
    order, the oldest first) while connection ``generation`` is the current one: the ids one
    ``multiple`` ack at the last of them covers, and the ids to acknowledge one by one. A
    ``multiple`` ack at a tag acknowledges every message its channel delivered up to that
    tag that nobody acknowledged yet, so it covers only the current connection's oldest held
    messages, as far as each of them is handled. Ids not held (acknowledged before) are left
    out."""
    wanted = set(handled)
    covered: list[int] = []
    for mid in held:
        if mid >> TAG_BITS != generation:
            continue  # an older connection's: its tags are not the channel's
        if mid not in wanted:
            break
        covered.append(mid)
    if len(covered) < 2:  # one message: a plain ack says the same
        covered = []
    done = set(covered)
    return covered, [mid for mid in handled if mid in held and mid not in done]


def _death(message: AbstractIncomingMessage) -> tuple[str, str]:
    """The hub's topic of a dead letter and why RabbitMQ dead-lettered it, from its
    ``x-death`` header (the routing key is the dead-letter queue's by then)."""
    deaths = (message.headers or {}).get("x-death")
    first = deaths[0] if isinstance(deaths, list) and deaths else {}
    first = first if isinstance(first, dict) else {}
    keys = first.get("routing-keys")
    key = keys[0] if isinstance(keys, list) and keys and isinstance(keys[0], str) else ""
    reason = first.get("reason")
    why = reason[:40] if isinstance(reason, str) and reason.isprintable() else "unknown reason"
    return uplink_topic(key), why
