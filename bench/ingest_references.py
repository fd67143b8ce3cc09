"""The reference consumers ``bench ingest`` measures the gateway against, each run as its own
processes sharing one MQTT 5 subscription to a private Mosquitto:

- ``bare``: paho -> CBOR decode -> binary COPY of the rows, one transaction per batch; no
  verification, consent, dedupe or receipts: the ceiling of any consumer on this machine;
- ``naive``: paho -> INSERT per reading, commit per message.

``prime`` creates a consumer's persistent session before the backlog is published, so the
backlog waits at the broker for it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.broker import MosquittoBroker
from ingest.transport import stop_client
from storage.timeconv import from_ms
from storage.writer import EpochMsDumper

SESSION_EXPIRY_S = 3600
REFERENCE_SUBSCRIPTION = "$share/bench/dct/v1/+/up"
BARE_MAX_BATCH = 500
BARE_MAX_WAIT_S = 0.05


def _persistent_connect(client: mqtt.Client, host: str, port: int) -> None:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    client.connect(host, port, clean_start=False, properties=props)


def _subscriber(host: str, port: int, client_id: str, on_message: Any, ready: Any) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )

    def on_connect(c: mqtt.Client, *_: object) -> None:
        c.subscribe(REFERENCE_SUBSCRIPTION, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: ready.set()
    client.on_message = on_message
    _persistent_connect(client, host, port)
    return client


def prime(broker: MosquittoBroker, client_ids: Sequence[str], subscription: str) -> None:
    """Create the consumers' persistent sessions and subscriptions, then leave: what is
    published next waits at the broker for them (the backlog a drain is measured on)."""
    for client_id in client_ids:
        done = threading.Event()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        client.on_connect = lambda c, *_: c.subscribe(subscription, qos=1)
        client.on_subscribe = lambda *_, done=done: done.set()
        _persistent_connect(client, broker.host, broker.port)
        client.loop_start()
        try:
            if not done.wait(10):
                raise RuntimeError(f"could not prime the session of {client_id}")
        finally:
            stop_client(client)


def _rows(payload: bytes, participants: dict[str, str], received_ms: int) -> list[tuple[Any, ...]]:
    sign1 = cbor2.loads(payload).value
    body = cbor2.loads(sign1[2])
    dev, seq = body["dev"], body["seq"]
    pid = participants[dev]
    return [(t, pid, m, v, u, dev, seq, s, received_ms, None) for t, m, v, u, s in body["r"]]


_COPY = (
    "COPY readings (time, participant_id, metric, value, unit, device_id, seq, sensor,"
    " received_at, consent_id) FROM STDIN (FORMAT BINARY)"
)
_TYPES = (
    "timestamptz",
    "text",
    "text",
    "float8",
    "text",
    "text",
    "int8",
    "text",
    "timestamptz",
    "int8",
)


def _participants(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return {
            str(d): str(p) for d, p in conn.execute("SELECT device_id, participant_id FROM devices")
        }


def _bare_main(url: str, host: str, port: int, worker: int, ready: Any, stop: Any) -> None:
    participants = _participants(url)
    inbox: queue.Queue[bytes] = queue.Queue()
    client = _subscriber(
        host, port, f"bench-bare-{worker}", lambda _c, _u, m: inbox.put(m.payload), ready
    )
    client.loop_start()
    with psycopg.connect(url) as conn:
        while not stop.is_set():
            try:
                batch = [inbox.get(timeout=0.1)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + BARE_MAX_WAIT_S
            while len(batch) < BARE_MAX_BATCH:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(inbox.get(timeout=left))
                except queue.Empty:
                    break
            received_ms = int(time.time() * 1000)
            # Times as integer milliseconds, dumped as the gateway's writer does: no
            # datetime per row, so that this stays the ceiling of what a consumer can do.
            with conn.cursor() as cur:
                cur.adapters.register_dumper(None, EpochMsDumper)
                with cur.copy(_COPY) as copy:
                    copy.set_types(_TYPES)
                    for payload in batch:
                        for row in _rows(payload, participants, received_ms):
                            copy.write_row(row)
            conn.commit()
    stop_client(client)


def _naive_main(url: str, host: str, port: int, worker: int, ready: Any, stop: Any) -> None:
    participants = _participants(url)
    conn = psycopg.connect(url)

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        received = datetime.now(UTC)
        for t, *fields, _, consent in _rows(bytes(m.payload), participants, 0):
            conn.execute(
                "INSERT INTO readings (time, participant_id, metric, value, unit, device_id,"
                " seq, sensor, received_at, consent_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (from_ms(t), *fields, received, consent),
            )
        conn.commit()

    client = _subscriber(host, port, f"bench-naive-{worker}", on_message, ready)
    client.loop_start()
    stop.wait()
    stop_client(client)
    conn.close()


@contextlib.contextmanager
def reference(kind: str, url: str, broker: MosquittoBroker, workers: int) -> Iterator[list[int]]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    readies = [ctx.Event() for _ in range(workers)]
    target = _bare_main if kind == "bare" else _naive_main
    procs = [
        ctx.Process(
            target=target,
            args=(url, broker.host, broker.port, i, readies[i], stop),
            name=f"bench-{kind}-{i}",
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        for r in readies:
            if not r.wait(30):
                raise RuntimeError(f"the {kind} subscriber did not subscribe within 30 s")
        yield [p.pid for p in procs if p.pid is not None]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
