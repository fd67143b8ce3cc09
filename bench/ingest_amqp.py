"""The RabbitMQ path of ``bench ingest --amqp``: a private RabbitMQ node, or a cluster of
them (``--amqp-nodes``; :class:`gateway.rabbitmq.RabbitCluster`), that the load is published
into over MQTT 3.1.1, as hubs publish to RabbitMQ 3.10, and that the gateway consumes over
AMQP from the uplink quorum queue (``TRIALSTREAM_MESSAGE_SOURCE=amqp``), measured the same
way as the gateway on Mosquitto in the same run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.mqtt_raw import Login
from gateway.amqp import UPLINK_QUEUE, dead_letter_queue, declare_uplink, shard_queues
from gateway.rabbitmq import RabbitCluster, RabbitNode

# The load generator's own user: it publishes every hub's envelopes, so it may write to
# every topic (hubs themselves get only their own, gateway.rabbitmq.hub_permissions).
BENCH_USER = "trialstream-bench"


@dataclass(frozen=True, slots=True)
class RabbitTarget:
    """Where the AMQP path's load goes: the node publishers and the gateway reach (the first;
    the uplink queue is declared there, so it leads it), every node of the cluster (whose
    CPU is the broker's), the publishers' login, and the uplink's queues (``shards``)."""

    nodes: tuple[RabbitNode, ...]
    login: Login
    shards: int = 1

    @property
    def entry(self) -> RabbitNode:
        return self.nodes[0]

    @property
    def broker_roots(self) -> list[int]:
        return [n.process.pid for n in self.nodes if n.process is not None]


@contextlib.contextmanager
def rabbit_target(workdir: Path, nodes: int = 1, shards: int = 1) -> Iterator[RabbitTarget]:
    """A private node, or a cluster of ``nodes`` (quorum queues replicated on each), for the
    run, with the publishers' login to its MQTT plugin; the uplink in ``shards`` queues."""
    cluster = RabbitCluster(workdir / "rabbitmq", nodes)
    cluster.start()
    try:
        password = secrets.token_urlsafe(16)
        cluster.add_user(BENCH_USER, password)
        cluster.ctl("set_permissions", BENCH_USER, ".*", ".*", ".*")
        yield RabbitTarget(tuple(cluster.nodes), Login(BENCH_USER, password, mqtt5=False), shards)
    finally:
        cluster.stop()


def fresh_uplink(node: RabbitNode, shards: int = 1) -> None:
    """The uplink's queues and its dead-letter queue emptied (deleted and declared again), so
    no backlog crosses from one measurement to the next; declared before any publish, since
    the MQTT plugin drops what no queue takes."""

    async def redeclare() -> None:
        import aio_pika

        connection = await aio_pika.connect(node.amqp_url)
        async with connection:
            channel = await connection.channel()
            for name in shard_queues(UPLINK_QUEUE, shards):
                await channel.queue_delete(name)
            await channel.queue_delete(dead_letter_queue(UPLINK_QUEUE))
            await declare_uplink(channel, UPLINK_QUEUE, shards)

    # Called from the benchmark's synchronous steps, which run inside its event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, redeclare()).result()
