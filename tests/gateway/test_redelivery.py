"""A message that stops a worker without raising (a crash in native code, the OOM killer) is
found and refused as ``poison`` by redelivery alone, and the messages that were only beside
it are stored.

The worker's death is a consumer whose decoding never returns when the killer message is
in its batch: it is stopped there, with the batch unacknowledged, and a new consumer takes
its broker session back (same client id), as a restarted worker does. The broker delivers
the unacknowledged messages again with DUP set, which is all the consumer has to go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from gateway import consumer_core as consumer_module
from gateway.broker import MosquittoBroker
from gateway.consumer import ALONE_AFTER, Consumer, ConsumerConfig
from gateway.judging import Message
from gateway.storing import POISON_AFTER
from ingest import keys
from ingest.envelope import seal
from ingest.model import Payload, Reading
from ingest.pipeline import up_topic
from storage import db
from storage.writer import BulkWriter
from tests.fixtures.mqtt import MqttProbe
from tests.fixtures.postgres import database_mode
from tests.fixtures.trial import Trial
from tests.fixtures.waiting import wait_until


def envelope(trial: Trial, seq: int) -> bytes:
    t = int(time.time() * 1000) - 1000
    readings = (Reading(t, "heart_rate", 70.0 + seq, "/min", "s"),)
    return seal(Payload("hub-1", seq, t, readings), trial.hubs["hub-1"].key)


class Killer:
    """Decoding that never returns for a batch holding ``payload``: the worker is dead."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.batches: list[list[bool]] = []  # per batch reaching decode: which were DUP
        self.stuck = asyncio.Event()
        self.release = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._decode = consumer_module.decode_and_check

    def __call__(self, messages: Sequence[Message], known: Any) -> Any:
        if any(m.payload == self.payload for m in messages):
            self.batches.append([m.dup for m in messages])
            self._loop.call_soon_threadsafe(self.stuck.set)
            self.release.wait(30)
            raise RuntimeError("the worker is gone")
        return self._decode(messages, known)


@contextlib.asynccontextmanager
async def worker(url: str, broker: MosquittoBroker) -> AsyncIterator[Consumer]:
    pool = await db.open_pool(url, min_size=1, max_size=2)
    c = Consumer(
        ConsumerConfig(broker.host, broker.port, "redelivery-worker"),
        pool,
        BulkWriter(pool, database_mode(url)),
        keys.generate_private_key(),
    )
    task = asyncio.create_task(c.run())
    try:
        async with asyncio.timeout(15):
            await c.wait_subscribed()
        yield c
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()


async def rows(url: str, query: str) -> list[tuple[Any, ...]]:
    async with db.connection(url) as conn:
        cur = await conn.execute(query.encode())
        return list(await cur.fetchall())


async def test_a_message_that_stops_workers_is_refused_and_its_batch_mates_stored(
    trial: Trial, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    killer, innocent = envelope(trial, 1), envelope(trial, 2)
    async with worker(trial.url, mosquitto):
        pass  # the worker's broker session exists: what is published now waits in it
    probe = MqttProbe(mosquitto, "redelivery-probe")
    probe.publish(up_topic("hub-1"), killer)
    probe.publish(up_topic("hub-1"), innocent)
    probe.close()

    deaths = 0
    while True:
        kill = Killer(killer)
        monkeypatch.setattr(consumer_module, "decode_and_check", kill)
        async with worker(trial.url, mosquitto) as c:
            done = asyncio.create_task(
                wait_until(lambda: c.stats.rejected_envelopes["poison"] == 1, "poison", within=10)
            )
            stuck = asyncio.create_task(kill.stuck.wait())
            await asyncio.wait({done, stuck}, return_when=asyncio.FIRST_COMPLETED)
            for task in (done, stuck):
                task.cancel()
            if kill.stuck.is_set():
                deaths += 1
                first = kill.batches[0]
                # The first worker had both, fresh; then both came back DUP in one batch
                # until they were tried ALONE_AFTER times; then the killer was alone.
                if deaths == 1:
                    assert first == [False, False]
                elif deaths <= 1 + ALONE_AFTER:
                    assert first == [True, True]
                else:
                    assert first == [True], f"death {deaths}: {first}"
            else:
                break
        kill.release.set()
        assert deaths <= POISON_AFTER + 1, "the killer was never refused"

    # Each try counted while handling started, after the first delivery: POISON_AFTER of
    # them, then one more delivery that refused it unread.
    assert deaths == POISON_AFTER + 1
    assert await rows(trial.url, "SELECT seq, value FROM readings JOIN envelopes USING (seq)") == [
        (2, 72.0)
    ]
    assert await rows(trial.url, "SELECT reason, device_id, seq, detail FROM rejections") == [
        (
            "poison",
            "hub-1",
            None,
            f"delivered {POISON_AFTER} times without its handling completing; not read",
        )
    ]
    # The killer's count stays on record; the innocent's is gone.
    assert await rows(trial.url, "SELECT attempts FROM message_faults") == [(POISON_AFTER,)]
