"""RabbitMQ as the broker in front of the gateway (docs/scaling.md), on a private node with its
MQTT plugin: a hub's QoS 1 publish reaches a durable quorum queue bound on ``amq.topic`` and is
acknowledged to the hub only then; a hub cannot publish as another; a message handed back too
often leaves the queue for a dead-letter queue instead of circulating forever."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pamqp.common import Arguments

from gateway.errors import BrokerError
from gateway.rabbitmq import RabbitNode
from tests.fixtures.waiting import wait_until


@pytest.fixture
async def channel(rabbit: RabbitNode) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(rabbit.amqp_url)
    async with connection:
        yield await connection.channel()


async def uplink_queue(
    channel: aio_pika.abc.AbstractChannel, arguments: Arguments = None
) -> aio_pika.abc.AbstractQueue:
    name = f"uplink-{secrets.token_hex(4)}"
    queue = await channel.declare_queue(
        name, durable=True, arguments={"x-queue-type": "quorum", **(arguments or {})}
    )
    await queue.bind("amq.topic", routing_key="dct.v1.#.up")
    return queue


def hub(rabbit: RabbitNode, device_id: str) -> mqtt.Client:
    password = secrets.token_hex(8)
    rabbit.add_hub(device_id, password)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(device_id, password)
    client.connect("127.0.0.1", rabbit.mqtt_port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.is_connected(), "the hub's MQTT connection was not accepted"
    return client


async def test_a_hubs_envelope_is_queued_then_acknowledged(
    rabbit: RabbitNode, channel: aio_pika.abc.AbstractChannel
) -> None:
    queue = await uplink_queue(channel)
    client = hub(rabbit, "hub-rmq.1")  # a dot in the id: the binding and permission hold
    try:
        sent = client.publish("dct/v1/hub-rmq.1/up", b"\x84signed", qos=1)
        sent.wait_for_publish(10)
        assert sent.is_published()
    finally:
        client.loop_stop()
        client.disconnect()
    message = await queue.get(timeout=10)
    assert message.body == b"\x84signed"
    assert message.routing_key == "dct.v1.hub-rmq.1.up"
    assert message.headers["x-mqtt-publish-qos"] == 1
    await message.ack()
    assert await queue.get(fail=False) is None


async def test_a_hub_publishing_as_another_is_disconnected_and_nothing_is_queued(
    rabbit: RabbitNode, channel: aio_pika.abc.AbstractChannel
) -> None:
    queue = await uplink_queue(channel)
    client = hub(rabbit, "hub-rmq-2")
    try:
        forged = client.publish("dct/v1/hub-rmq-3/up", b"forged", qos=1)
        # MQTT 3.1.1 has no refusal: the broker hangs up.
        await wait_until(lambda: not client.is_connected(), "the forger disconnected")
        assert not forged.is_published()  # and no PUBACK came
    finally:
        client.loop_stop()
    assert await queue.get(fail=False) is None


async def test_a_message_handed_back_too_often_is_dead_lettered(
    rabbit: RabbitNode, channel: aio_pika.abc.AbstractChannel
) -> None:
    dead = await channel.declare_queue(
        f"dead-{secrets.token_hex(4)}", durable=True, arguments={"x-queue-type": "quorum"}
    )
    queue = await uplink_queue(
        channel,
        {
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead.name,
        },
    )
    await channel.default_exchange.publish(
        aio_pika.Message(b"poison", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key=queue.name,
    )
    counts = []
    for _ in range(3):
        message = await queue.get(timeout=10)
        counts.append(message.headers.get("x-delivery-count", 0))
        await message.nack(requeue=True)
    assert counts == [0, 1, 2]
    assert await queue.get(fail=False) is None
    letter = await dead.get(timeout=10)
    assert letter.body == b"poison"
    deaths = letter.headers["x-death"]
    assert isinstance(deaths, list)
    first = deaths[0]
    assert isinstance(first, dict)
    assert first["reason"] == "delivery_limit"
    await letter.ack()


@pytest.mark.parametrize("device_id", ["", "hub.*", "hub|x", "a" * 65, "hub\x00", "hub/up"])
def test_a_hub_identity_takes_only_a_device_id(rabbit: RabbitNode, device_id: str) -> None:
    with pytest.raises(BrokerError, match="not a device id"):
        rabbit.add_hub(device_id, "unused")


@pytest.mark.parametrize("password", ["-starts-with-a-dash", "--", "-n"])
def test_a_password_that_looks_like_an_option_is_still_the_password(
    rabbit: RabbitNode, password: str
) -> None:
    """``secrets.token_urlsafe`` starts with ``-`` once in 64: rabbitmqctl refused such a
    password as an unknown option, and a cluster or a benchmark failed to start."""
    user = f"dash-{secrets.token_hex(3)}"
    rabbit.add_user(user, password)
    try:
        done = rabbit.ctl("authenticate_user", "--", user, password, check=False)
        assert done.returncode == 0, done.stderr
        wrong = rabbit.ctl("authenticate_user", "--", user, password + "x", check=False)
        assert wrong.returncode != 0
    finally:
        rabbit.ctl("delete_user", "--", user)


def test_without_rabbitmq_it_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="apt-get install rabbitmq-server"):
        RabbitNode(tmp_path, bin_dir=tmp_path / "nowhere")
