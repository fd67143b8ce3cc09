"""The RabbitMQ path of ``bench ingest --amqp``: a private RabbitMQ node (its MQTT plugin
and AMQP, :class:`gateway.rabbitmq.RabbitNode`) that the load is published into over MQTT
3.1.1, as hubs publish to RabbitMQ 3.10, and that the gateway consumes over AMQP from the
uplink quorum queue (``TRIALSTREAM_MESSAGE_SOURCE=amqp``), measured the same way as the
gateway on Mosquitto in the same run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from bench.mqtt_raw import Login
from gateway.amqp import UPLINK_QUEUE, dead_letter_queue, declare_uplink
from gateway.rabbitmq import RabbitNode

# The load generator's own user: it publishes every hub's envelopes, so it may write to
# every topic (hubs themselves get only their own, gateway.rabbitmq.hub_permissions).
BENCH_USER = "trialstream-bench"


@contextlib.contextmanager
def rabbit_node(workdir: Path) -> Iterator[tuple[RabbitNode, Login]]:
    """A private node for the run, and the publishers' login to its MQTT plugin."""
    node = RabbitNode(workdir / "rabbitmq")
    node.start()
    try:
        password = secrets.token_urlsafe(16)
        node.ctl("add_user", BENCH_USER, password)
        node.ctl("set_permissions", BENCH_USER, ".*", ".*", ".*")
        yield node, Login(BENCH_USER, password, mqtt5=False)
    finally:
        node.stop()


def fresh_uplink(node: RabbitNode) -> None:
    """The uplink queue and its dead-letter queue emptied (deleted and declared again), so
    no backlog crosses from one measurement to the next; declared before any publish, since
    the MQTT plugin drops what no queue takes."""

    async def redeclare() -> None:
        import aio_pika

        connection = await aio_pika.connect(node.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(UPLINK_QUEUE)
            await channel.queue_delete(dead_letter_queue(UPLINK_QUEUE))
            await declare_uplink(channel)

    # Called from the benchmark's synchronous steps, which run inside its event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, redeclare()).result()
