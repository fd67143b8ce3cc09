"""The gateway fed by RabbitMQ (gateway.amqp): a hub publishes over MQTT 3.1.1 to RabbitMQ's
MQTT plugin, the envelope waits in the uplink quorum queue, a worker consuming over AMQP stores
it exactly once, acknowledges it only after COMMIT and sends the signed receipt back to the
hub's down topic; a message the broker delivers again is receipted as a replay, not stored
twice; a hostile message is refused with a row and takes nothing else with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from gateway.amqp import (
    DELIVERY_LIMIT,
    MAX_SHARDS,
    TAG_BITS,
    AmqpConsumer,
    ack_plan,
    dead_letter_queue,
    declare_uplink,
    routing_key,
    shard_queues,
    uplink_topic,
)
from gateway.broker import MosquittoBroker
from gateway.consumer import ConsumerConfig
from gateway.errors import ConfigError
from gateway.rabbitmq import MAX_MESSAGE_BYTES, RabbitNode
from gateway.settings import Settings
from ingest import keys
from ingest.envelope import seal
from ingest.model import Payload, Reading
from ingest.pipeline import down_topic, up_topic
from ingest.receipts import open_receipt
from storage import alerts, db
from storage.writer import BulkWriter
from tests.fixtures.gateway import gateway_settings, running_gateway
from tests.fixtures.postgres import database_mode
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.slow


def envelope(trial: Trial, seq: int, value: float = 70.0, hub: str = "hub-1") -> bytes:
    t = int(time.time() * 1000) - 1000
    readings = (Reading(t, "heart_rate", value, "/min", "strap"),)
    return seal(Payload(hub, seq, t, readings), trial.hubs[hub].key)


class Hub:
    """A hub's MQTT 3.1.1 connection to RabbitMQ, subscribed to its down topic."""

    def __init__(self, rabbit: RabbitNode, device_id: str) -> None:
        password = secrets.token_hex(8)
        with contextlib.suppress(Exception):
            rabbit.ctl("delete_user", device_id, check=False)
        rabbit.add_hub(device_id, password)
        self.received: queue.Queue[bytes] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(device_id, password)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_message = lambda _c, _u, m: self.received.put(bytes(m.payload))
        self.client.connect("127.0.0.1", rabbit.mqtt_port)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.client.is_connected(), "the hub's MQTT connection was not accepted"
        self.client.subscribe(down_topic(device_id), qos=1)
        time.sleep(0.5)  # the subscription's queue and binding exist

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), "RabbitMQ did not acknowledge the publish"

    async def receipt(self, key: ec.EllipticCurvePublicKey) -> Any:
        data = await asyncio.to_thread(self.received.get, True, 20)
        return open_receipt(data, key)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.asynccontextmanager
async def worker(
    url: str,
    rabbit: RabbitNode,
    name: str,
    receipt_key: ec.EllipticCurvePrivateKey,
    urls: list[str] | None = None,
    shards: int = 1,
) -> AsyncIterator[AmqpConsumer]:
    pool = await db.open_pool(url, min_size=1, max_size=2)
    c = AmqpConsumer(
        ConsumerConfig("unused", 0, "amqp-worker"),
        urls or [f"amqp://guest:guest@127.0.0.1:{free_port_closed()}/", rabbit.amqp_url],
        pool,
        BulkWriter(pool, database_mode(url)),
        receipt_key,
        queue=name,
        shards=shards,
    )
    task = asyncio.create_task(c.run())
    try:
        async with asyncio.timeout(20):
            await c.wait_subscribed()
        yield c
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()


def free_port_closed() -> int:
    """A port nothing listens on: the first node of the list is down."""
    from gateway.broker import free_port

    return free_port()


async def count(url: str, query: str) -> int:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode())
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def drained(rabbit: RabbitNode, name: str) -> bool:
    """Whether the queue holds nothing, ready or unacknowledged."""
    return await asyncio.to_thread(queue_depth, rabbit, name) == (0, 0)


def queue_depth(rabbit: RabbitNode, name: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of a queue."""
    out = rabbit.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged").stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"no queue {name} in {out!r}")


@pytest.fixture
def queue_name() -> str:
    return f"uplink-test-{secrets.token_hex(4)}"


async def declared(rabbit: RabbitNode, name: str, shards: int = 1) -> None:
    """The queue exists before hubs publish (RabbitMQ drops what no queue takes)."""
    connection = await aio_pika.connect(rabbit.amqp_url)
    async with connection:
        await declare_uplink(await connection.channel(), name, shards)


async def publish_amqp(rabbit: RabbitNode, messages: list[tuple[str, bytes]]) -> None:
    """Publish on amq.topic as RabbitMQ's MQTT plugin does: (MQTT topic, payload)."""
    connection = await aio_pika.connect(rabbit.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("amq.topic")
        for topic, payload in messages:
            await exchange.publish(aio_pika.Message(payload), routing_key=routing_key(topic))


def test_topics_and_routing_keys_map_both_ways_with_dotted_device_ids() -> None:
    assert routing_key(up_topic("hub.1")) == "dct.v1.hub.1.up"
    assert uplink_topic("dct.v1.hub.1.up") == up_topic("hub.1")
    assert uplink_topic("dct.v1.x.up.up") == up_topic("x.up")
    assert uplink_topic("dct.v1.up") == "dct.v1.up"  # no device: refused at decode
    assert uplink_topic("other.key") == "other.key"


async def test_an_envelope_through_rabbitmq_is_stored_once_acked_and_receipted(
    trial: Trial, rabbit: RabbitNode, queue_name: str
) -> None:
    await declared(rabbit, queue_name)
    hub = Hub(rabbit, "hub-1")
    receipt_key = keys.generate_private_key()
    try:
        async with worker(trial.url, rabbit, queue_name, receipt_key) as c:
            hub.publish(up_topic("hub-1"), envelope(trial, 1))
            receipt = await hub.receipt(receipt_key.public_key())
            assert (receipt.dev, receipt.seq, receipt.status, receipt.stored) == (
                "hub-1",
                1,
                "accepted",
                1,
            )
            await wait_until(lambda: drained(rabbit, queue_name), "acked")
            assert c.stats.envelopes_new == 1
    finally:
        hub.close()
    assert await count(trial.url, "SELECT count(*) FROM readings") == 1


def test_one_multiple_ack_covers_only_the_oldest_held_messages_all_handled() -> None:
    def held(*mids: int) -> dict[int, None]:
        return dict.fromkeys(mids)

    # 1 2 3 4 held, 1 2 4 handled: a multiple ack at 2; 4 alone (3 is not committed yet).
    assert ack_plan(held(1, 2, 3, 4), [4, 1, 2], 0) == ([1, 2], [4])
    # The oldest held not handled: nothing may be covered.
    assert ack_plan(held(1, 2, 3), [2, 3], 0) == ([], [2, 3])
    # One message: a plain ack.
    assert ack_plan(held(1, 2), [1], 0) == ([], [1])
    # Acknowledged before, or never held: left out.
    assert ack_plan(held(5, 6, 7), [5, 6, 7, 3], 0) == ([5, 6, 7], [])
    assert ack_plan(held(), [1, 2], 0) == ([], [])
    # An older connection's messages are not the channel's: never under the ack, each alone.
    old, new = 1 << TAG_BITS, 2 << TAG_BITS
    assert ack_plan(held(old | 9, new | 1, new | 2), [new | 1, new | 2], 2) == (
        [new | 1, new | 2],
        [],
    )
    assert ack_plan(held(old | 9, new | 1, new | 2), [old | 9, new | 2, new | 1], 2) == (
        [new | 1, new | 2],
        [old | 9],
    )
    # The same tags on an older connection are not the current one's messages.
    assert ack_plan(held(old | 1, old | 2, new | 1, new | 2), [old | 1, old | 2], 2) == (
        [],
        [old | 1, old | 2],
    )


async def test_a_batch_of_waiting_envelopes_is_acknowledged_with_one_multiple_ack(
    trial: Trial, rabbit: RabbitNode, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    acks: list[tuple[int, bool]] = []
    send_ack = AmqpConsumer._send_ack

    async def counted(self: AmqpConsumer, mid: int, message: Any, *, multiple: bool) -> None:
        acks.append((mid, multiple))
        await send_ack(self, mid, message, multiple=multiple)

    monkeypatch.setattr(AmqpConsumer, "_send_ack", counted)
    await declared(rabbit, queue_name)
    hub = Hub(rabbit, "hub-1")
    try:
        for seq in range(1, 41):
            hub.publish(up_topic("hub-1"), envelope(trial, seq))
        async with worker(trial.url, rabbit, queue_name, keys.generate_private_key()) as c:
            await wait_until(lambda: c.stats.envelopes_new == 40, "all stored", within=30)
            await wait_until(lambda: drained(rabbit, queue_name), "all acknowledged")
            assert c.stats.envelopes_replayed == 0
    finally:
        hub.close()
    assert await count(trial.url, "SELECT count(*) FROM readings") == 40
    assert any(multiple for _, multiple in acks)
    assert len(acks) < 40


def test_an_uplink_has_one_queue_or_up_to_16_shards() -> None:
    assert shard_queues("up", 1) == ["up"]
    assert shard_queues("up", 3) == ["up.0", "up.1", "up.2"]
    for bad in (0, -1, MAX_SHARDS + 1):
        with pytest.raises(ValueError, match="1 to 16"):
            shard_queues("up", bad)
    assert Settings.from_env({"TRIALSTREAM_AMQP_SHARDS": "4"}).amqp_shards == 4
    assert Settings().amqp_shards == 1
    for raw in ("0", "17", "-1", "x", "1e3", "9" * 5000, " "):
        with pytest.raises(ConfigError, match="TRIALSTREAM_AMQP_SHARDS"):
            Settings.from_env({"TRIALSTREAM_AMQP_SHARDS": raw})


async def test_a_sharded_uplink_keeps_each_hubs_envelopes_in_one_queue_and_stores_all(
    trial: Trial, rabbit: RabbitNode, queue_name: str
) -> None:
    hubs = [f"hub-{i}" for i in range(1, 9)]
    for i, hub in enumerate(hubs[1:], start=2):
        await trial.add_participant(f"P{i}", hub)
    await declared(rabbit, queue_name, shards=3)
    await publish_amqp(
        rabbit,
        [(up_topic(hub), envelope(trial, seq, hub=hub)) for hub in hubs for seq in (1, 2, 3)],
    )
    depths: list[int] = []

    async def all_queued() -> bool:
        depths[:] = [
            (await asyncio.to_thread(queue_depth, rabbit, q))[0]
            for q in shard_queues(queue_name, 3)
        ]
        return sum(depths) == 24

    await wait_until(all_queued, "24 envelopes in the shards", within=15)
    # Each hub's three envelopes hash to one queue: every depth is a multiple of three, and
    # the eight hubs spread over more than one queue.
    assert all(d % 3 == 0 for d in depths), depths
    assert sum(d > 0 for d in depths) >= 2, depths
    async with worker(trial.url, rabbit, queue_name, keys.generate_private_key(), shards=3) as c:
        await wait_until(lambda: c.stats.envelopes_new == 24, "all stored", within=30)
        for q in shard_queues(queue_name, 3):
            await wait_until(lambda q=q: drained(rabbit, q), f"{q} acknowledged")
        # An acknowledgement the broker refused would have closed the channel and brought
        # the messages back as replays.
        assert c.stats.envelopes_replayed == 0
    assert await count(trial.url, "SELECT count(*) FROM readings") == 24


async def test_a_worker_whose_queue_is_deleted_consumes_again_once_it_is_declared(
    trial: Trial, rabbit: RabbitNode, queue_name: str
) -> None:
    """The broker cancels the consumer of a deleted queue while the connection lives: the
    worker notices, declares the uplink again and goes on."""
    await declared(rabbit, queue_name, shards=2)
    async with worker(trial.url, rabbit, queue_name, keys.generate_private_key(), shards=2) as c:
        connection = await aio_pika.connect(rabbit.amqp_url)
        async with connection:
            await (await connection.channel()).queue_delete(shard_queues(queue_name, 2)[1])

        async def redeclared() -> bool:
            out = await asyncio.to_thread(rabbit.ctl, "list_queues", "name")
            return shard_queues(queue_name, 2)[1] in out.stdout.split()

        await wait_until(redeclared, "the deleted shard declared again", within=20)
        await publish_amqp(rabbit, [(up_topic("hub-1"), envelope(trial, 5))])
        await wait_until(lambda: c.stats.envelopes_new == 1, "stored", within=20)
    assert await count(trial.url, "SELECT count(*) FROM readings") == 1


async def test_a_message_delivered_again_is_a_replay_not_a_second_copy(
    trial: Trial, rabbit: RabbitNode, queue_name: str
) -> None:
    await declared(rabbit, queue_name)
    hub = Hub(rabbit, "hub-1")
    receipt_key = keys.generate_private_key()
    sealed = envelope(trial, 7)
    try:
        async with worker(trial.url, rabbit, queue_name, receipt_key):
            hub.publish(up_topic("hub-1"), sealed)
            await hub.receipt(receipt_key.public_key())
            # The receipt goes out before the acknowledgement: stopping the worker in
            # between would leave it to be delivered again too.
            await wait_until(lambda: drained(rabbit, queue_name), "acked")
        # The same envelope again (a hub that lost the receipt), and one a reader took and
        # dropped unacknowledged: RabbitMQ delivers it again, marked redelivered.
        hub.publish(up_topic("hub-1"), sealed)
        connection = await aio_pika.connect(rabbit.amqp_url)
        async with connection:
            channel = await connection.channel()
            q = await channel.get_queue(queue_name)
            taken = await q.get(timeout=10, fail=True)
            assert taken is not None
            await taken.nack(requeue=True)
        async with worker(trial.url, rabbit, queue_name, receipt_key) as c:
            receipt = await hub.receipt(receipt_key.public_key())
            assert (receipt.seq, receipt.status, receipt.stored) == (7, "accepted", 1)
            await wait_until(lambda: drained(rabbit, queue_name), "acked")
            assert c.stats.envelopes_replayed == 1
    finally:
        hub.close()
    assert await count(trial.url, "SELECT count(*) FROM readings") == 1


async def test_a_hostile_message_is_refused_with_a_row_and_the_next_one_is_stored(
    trial: Trial, rabbit: RabbitNode, queue_name: str
) -> None:
    await declared(rabbit, queue_name)
    hub = Hub(rabbit, "hub-1")
    receipt_key = keys.generate_private_key()
    try:
        async with worker(trial.url, rabbit, queue_name, receipt_key):
            hub.publish(up_topic("hub-1"), b"\xff" * 300)
            hub.publish(up_topic("hub-1"), envelope(trial, 2))
            await wait_until(
                lambda: count(trial.url, "SELECT count(*) FROM readings"), "stored", within=20
            )
            await wait_until(lambda: drained(rabbit, queue_name), "acked")
    finally:
        hub.close()
    assert await count(trial.url, "SELECT count(*) FROM rejections") == 1


async def test_the_gateway_set_to_amqp_stores_receipts_and_publishes_alert_events(
    trial: Trial, rabbit: RabbitNode, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with db.connection(trial.url, autocommit=True) as conn:
        await alerts.add_rule(
            conn, study_id="S1", name="hr-high", metric="heart_rate", high=120.0, created_by="t"
        )
    settings = replace(
        gateway_settings(trial.url, mosquitto, tmp_path / "gateway"),
        message_source="amqp",
        amqp_urls=rabbit.amqp_url,
    )
    connection = await aio_pika.connect(rabbit.amqp_url)
    async with connection:
        channel = await connection.channel()
        events = await channel.declare_queue(exclusive=True)
        await events.bind("amq.topic", routing_key=routing_key("dct/v1/alerts/#"))
        async with running_gateway(settings) as gw:
            hub = Hub(rabbit, "hub-1")
            try:
                hub.publish(up_topic("hub-1"), envelope(trial, 1, value=150.0))
                receipt = await hub.receipt(gw.receipt_public_key)
                assert (receipt.seq, receipt.status, receipt.stored) == (1, "accepted", 1)
            finally:
                hub.close()
            event = await events.get(timeout=20, fail=True)
            assert event is not None
            await event.ack()
    assert event.routing_key == "dct.v1.alerts.S1"
    assert json.loads(event.body)["event"] == "opened"
    assert await count(trial.url, "SELECT count(*) FROM alert_outbox") == 0


async def test_a_message_past_the_brokers_size_bound_never_reaches_the_queue(
    trial: Trial, rabbit: RabbitNode, queue_name: str
) -> None:
    await declared(rabbit, queue_name)
    hub = Hub(rabbit, "hub-1")
    try:
        info = hub.client.publish(up_topic("hub-1"), b"\x00" * (MAX_MESSAGE_BYTES + 1), qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5)
        assert not info.is_published(), "RabbitMQ acknowledged a message past its bound"
    finally:
        hub.close()
    assert await asyncio.to_thread(queue_depth, rabbit, queue_name) == (0, 0)


async def test_a_dead_letter_leaves_a_rejection_row_before_it_is_acknowledged(
    trial: Trial, rabbit: RabbitNode, queue_name: str
) -> None:
    await declared(rabbit, queue_name)
    hub = Hub(rabbit, "hub-1")
    try:
        hub.publish(up_topic("hub-1"), envelope(trial, 3))
    finally:
        hub.close()
    # Handed back past the delivery limit (as by workers dying on it): RabbitMQ moves it to
    # the dead-letter queue instead of delivering it again.
    connection = await aio_pika.connect(rabbit.amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue_name)
        for _ in range(DELIVERY_LIMIT + 1):
            taken = await q.get(timeout=10, fail=False)
            if taken is None:
                break
            await taken.nack(requeue=True)
    assert await asyncio.to_thread(queue_depth, rabbit, queue_name) == (0, 0)

    async def dead_lettered() -> bool:
        depth = await asyncio.to_thread(queue_depth, rabbit, dead_letter_queue(queue_name))
        return depth == (1, 0)

    # Dead-lettering from a quorum queue happens after the last return, not within it.
    await wait_until(dead_lettered, "the message in the dead-letter queue", within=15)
    async with worker(trial.url, rabbit, queue_name, keys.generate_private_key()) as c:
        await wait_until(lambda: c.stats.rejected_envelopes["poison"] == 1, "the dead letter")
        dead = dead_letter_queue(queue_name)
        await wait_until(lambda: drained(rabbit, dead), "the dead letter acknowledged")
    rows = await fetch(
        trial.url, "SELECT reason, device_id, topic, detail FROM rejections ORDER BY received_at"
    )
    assert len(rows) == 1
    reason, device, topic, detail = rows[0]
    assert (reason, device, topic) == ("poison", "hub-1", up_topic("hub-1"))
    assert detail == (
        f"dead-lettered by RabbitMQ (delivery_limit, limit {DELIVERY_LIMIT}); not read"
    )
    assert await count(trial.url, "SELECT count(*) FROM readings") == 0


async def fetch(url: str, query: str) -> list[tuple[object, ...]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode())
        return list(await cur.fetchall())


async def test_a_worker_whose_node_dies_consumes_from_the_next_node_of_its_list(
    trial: Trial, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    first = RabbitNode(tmp_path / "first")
    await asyncio.to_thread(first.start)
    receipt_key = keys.generate_private_key()
    hubs: list[Hub] = []
    try:
        for node in (first, rabbit):
            await declared(node, queue_name)
        async with worker(
            trial.url, rabbit, queue_name, receipt_key, [first.amqp_url, rabbit.amqp_url]
        ) as c:
            assert c.node_url is not None
            assert f":{first.amqp_port}/" in c.node_url
            hubs.append(Hub(first, "hub-1"))
            hubs[0].publish(up_topic("hub-1"), envelope(trial, 1))
            assert (await hubs[0].receipt(receipt_key.public_key())).stored == 1

            await asyncio.to_thread(first.kill)
            await wait_until(
                lambda: c.node_url is not None and f":{rabbit.amqp_port}/" in c.node_url,
                "the worker consumes from the surviving node",
            )
            hubs.append(Hub(rabbit, "hub-1"))
            hubs[1].publish(up_topic("hub-1"), envelope(trial, 2))
            receipt = await hubs[1].receipt(receipt_key.public_key())
            assert (receipt.seq, receipt.status, receipt.stored) == (2, "accepted", 1)
    finally:
        for hub in hubs:
            hub.close()
        await asyncio.to_thread(first.stop)
    assert await count(trial.url, "SELECT count(*) FROM readings") == 2
