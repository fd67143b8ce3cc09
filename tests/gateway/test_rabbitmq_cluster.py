"""A three-node RabbitMQ cluster on this machine (gateway.rabbitmq.RabbitCluster) under a
fault: a hub's relay streams signed readings over MQTT 3.1.1 into the node that leads the
replicated uplink quorum queue, and a gateway worker consumes that queue over AMQP from the
same node; the node is killed (-9) mid-stream. The queue elects a new leader, the hub and the
worker each move to the next address they know, the hub's persistent session (a quorum
queue too) still holds its receipts' subscription, and afterwards every reading the hub made
is stored exactly once and receipted, with no rejection."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from device_drivers.clock import HubClock
from device_drivers.hub import OutboxSink
from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway.amqp import declare_uplink, shard_queues
from gateway.errors import BrokerError
from gateway.rabbitmq import RabbitCluster
from ingest import keys
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until
from tests.gateway.test_amqp_consumer import worker
from tests.test_hub_faults import HubUnderTest, stored

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    c = RabbitCluster(tmp_path / "rabbit", 3)
    try:
        c.start()
    except BrokerError as exc:
        pytest.fail(f"the test's RabbitMQ cluster could not start: {exc}")
    try:
        yield c
    finally:
        c.stop()


async def declared(url: str, name: str, shards: int = 1) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        await declare_uplink(await connection.channel(), name, shards)


def test_the_cluster_has_three_nodes_a_quorum_queue_on_each_and_shards_led_apart(
    cluster: RabbitCluster,
) -> None:
    out = cluster.ctl("cluster_status", "--formatter", "json").stdout
    for node in cluster.nodes:
        assert node.name in out
    name = f"uplink-{secrets.token_hex(3)}"
    asyncio.run(declared(cluster.nodes[1].amqp_url, name))
    members = cluster.ctl("list_queues", "name", "members", "--quiet", "--no-table-headers").stdout
    (line,) = [x for x in members.splitlines() if x.startswith(name + "\t")]
    assert all(node.name in line for node in cluster.nodes), line
    # A sharded uplink declared through one node: its shards are led on different nodes.
    sharded = f"uplink-{secrets.token_hex(3)}"
    asyncio.run(declared(cluster.nodes[0].amqp_url, sharded, shards=3))
    leaders = {cluster.leader(q).name for q in shard_queues(sharded, 3)}
    assert len(leaders) >= 2, leaders


async def test_the_queue_leaders_node_killed_mid_stream_loses_and_doubles_nothing(
    trial: Trial, cluster: RabbitCluster, tmp_path: Path
) -> None:
    name = f"uplink-{secrets.token_hex(3)}"
    await declared(cluster.nodes[0].amqp_url, name)
    leader = cluster.leader(name)
    others = [n for n in cluster.nodes if n is not leader]
    hub = trial.hubs["hub-1"]
    password = secrets.token_hex(8)
    await asyncio.to_thread(cluster.add_hub, hub.device_id, password)
    receipt_key = keys.generate_private_key()

    def login(client: mqtt.Client) -> None:
        client.username_pw_set(hub.device_id, password)
        client.reconnect_delay_set(1, 2)

    outbox = Outbox.open(tmp_path / "outbox.sqlite", hub.device_id)
    sink = OutboxSink(outbox, HubClock(time.time))
    relay = Relay(
        # The hub speaks to the leader's node first, knowing the others' addresses; MQTT
        # 3.1.1, as RabbitMQ 3.10 has no 5.
        RelayConfig(
            hub.device_id,
            "127.0.0.1",
            leader.mqtt_port,
            seal_max_readings=20,
            seal_max_age_s=0.2,
            resend_after_s=3.0,
            tick_s=0.05,
            mqtt5=False,
            alternates=tuple(("127.0.0.1", n.mqtt_port) for n in others),
        ),
        outbox,
        hub.key,
        receipt_key.public_key(),
        configure_client=login,
    )
    under = HubUnderTest(relay, outbox, sink)
    relaying = asyncio.create_task(relay.run(), name="test-hub-relay")
    # The worker reaches the leader first, the surviving nodes after it.
    urls = [leader.amqp_url, *(n.amqp_url for n in others)]
    try:
        async with worker(trial.url, others[0], name, receipt_key, urls) as c:
            assert c.node_url is not None
            assert f":{leader.amqp_port}/" in c.node_url
            for _ in range(10):
                await under.produce(10)
                await asyncio.sleep(0.1)
            await wait_until(under.drained, "the first readings receipted")

            produce_more = asyncio.create_task(_stream(under, 40))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(leader.kill)
            await produce_more
            await wait_until(
                lambda: c.node_url is not None and f":{leader.amqp_port}/" not in c.node_url,
                "the worker consumes from a surviving node",
            )
            await wait_until(under.drained, "every reading receipted", within=90)
            assert relay.stats.connected
            assert cluster.leader(name) in others
            next_seq = outbox.stats().next_seq
    finally:
        relaying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relaying
        outbox.close()
    result = await stored(trial.url)
    assert result.readings == under.produced == 100 + 400
    assert result.envelopes == (next_seq - 1, 1, next_seq - 1, under.produced)
    assert result.rejections == 0
    assert relay.stats.receipts_accepted == next_seq - 1
    assert relay.stats.receipts_rejected == 0


async def _stream(hub: HubUnderTest, rounds: int) -> None:
    """Ten readings every 100 ms, as a wearable's session hands them to the outbox."""
    for _ in range(rounds):
        await hub.produce(10)
        await asyncio.sleep(0.1)
