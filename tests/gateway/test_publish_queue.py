"""A worker's publishing connection holds a bounded number of unacknowledged publishes:
paho keeps each QoS 1 publish in memory until the broker acknowledges it, without a bound
unless one is set, and a broker slow to acknowledge receipts grew a worker without end."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from gateway import consumer
from gateway.broker import MosquittoBroker
from ingest.model import Receipt
from ingest.receipts import RECEIPT_ACCEPTED
from ingest.transport import stop_client
from tests.fixtures.waiting import wait_until

BOUND = 5


def queued_publishes(client: mqtt.Client) -> int:
    """QoS 1 publishes paho holds until the broker acknowledges them (it has no public
    count of them)."""
    return len(client._out_messages)


@pytest.fixture
def client(mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch) -> Iterator[mqtt.Client]:
    monkeypatch.setattr(consumer, "MAX_QUEUED_PUBLISHES", BOUND)
    c = consumer.publisher_client("publish-queue-test", mqtt5=True)
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    assert connected.wait(10), "could not connect to the test broker"
    try:
        yield c
    finally:
        stop_client(c)


async def test_receipts_past_the_bound_are_refused_and_counted_while_the_broker_lags(
    mosquitto: MosquittoBroker, client: mqtt.Client
) -> None:
    worker = SimpleNamespace(_out=client, stats=consumer.Stats())
    pid = mosquitto.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the broker acknowledges nothing
    try:
        for seq in range(1, BOUND + 3):
            receipt = Receipt(f"dev-{seq}", seq, RECEIPT_ACCEPTED, 1, 0, 0)
            await consumer.Consumer._publish_receipt(worker, receipt, b"sealed receipt")  # type: ignore[arg-type]
        assert queued_publishes(client) == BOUND
        assert worker.stats.receipt_publish_failures == 2
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_until(lambda: queued_publishes(client) == 0, "the held publishes acknowledged")
    await consumer.Consumer._publish_receipt(  # type: ignore[arg-type]
        worker, Receipt("dev-9", 9, RECEIPT_ACCEPTED, 1, 0, 0), b"sealed receipt"
    )
    assert worker.stats.receipt_publish_failures == 2
