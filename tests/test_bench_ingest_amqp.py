"""`bench ingest --amqp` measures what it says: the backlog it publishes over MQTT 3.1.1
reaches the RabbitMQ node's uplink queue, and the gateway it starts in amqp mode drains it
into the database with nothing refused; a second measurement starts from an empty queue."""

from __future__ import annotations

import time
from pathlib import Path

import aio_pika
import pytest

from bench.ingest import _amqp_drain
from bench.ingest_amqp import fresh_uplink, rabbit_target
from bench.load import Publishers, create_trial
from gateway.amqp import UPLINK_QUEUE
from tests.alerts.test_engine import rows

pytestmark = pytest.mark.slow


async def queued(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(UPLINK_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def test_the_backlog_goes_through_rabbitmq_into_the_database(
    empty_database_url: str, tmp_path: Path
) -> None:
    url = empty_database_url
    t0_ms = int((time.time() - 86_400) * 1000)
    hubs = await create_trial(url, 4, t0_ms - 86_400_000, 3 * 86_400_000)
    pubs = Publishers(hubs, 10, 200, t0_ms)
    try:
        with rabbit_target(tmp_path) as rabbit:
            node = rabbit.entry
            result = _amqp_drain(url, rabbit, pubs, 3.0, 10, tmp_path, 1)
            assert result["backlog_envelopes"] == pubs.sealed == 200
            assert result["readings_refused"] == 0
            # A small backlog: drained whole by the end of the window.
            assert result["backlog_at_end"] is False
            assert await rows(
                url, "SELECT count(*), count(DISTINCT (device_id, seq, time)) FROM readings"
            ) == [(2000, 2000)]
            # What the window left in the queue is gone before the next measurement.
            fresh_uplink(node)
            assert await queued(node.amqp_url) == 0
    finally:
        pubs.close()
