"""``trialstream bench hub``: the hub's outbox and relay.

Two figures per batch size (readings per envelope: 1, 10, 100), each against a baseline
measured in the same run:

1. Sealing: envelopes/s that :meth:`~device_drivers.outbox.Outbox.seal_pending` turns out
   of pending readings (one transaction: read the rows, encode, sign ES256, insert the
   envelopes, delete the rows, COMMIT with ``synchronous=FULL``). Baseline: ``cbor2.dumps``
   of the same payloads as plain lists and maps, no checks, no signature, no SQLite. The
   same payloads sealed in memory (``ingest.envelope.seal``: checks + CBOR + signature) are
   measured too, so the SQLite share and the signature share can be told apart.
2. Relaying: readings/s a :class:`~device_drivers.relay.Relay` gets receipted through a
   local Mosquitto (plain loopback, started for the run): already sealed envelopes,
   from the relay's connection to an empty outbox. Something must receipt: a small
   subscriber in this process opens each envelope (no signature check, no database) and
   answers with a receipt signed by a gateway key (``seal_receipt``), as the gateway does
   after COMMIT. Baseline: the same envelope bytes published by a bare paho client at QoS 1
   (paho's default of 20 in flight, the relay's default too), until every PUBACK is back.

Everything shares this machine's cores with the broker and the receipting subscriber, so
the relay figures are an end-to-end loop on one machine, not the relay alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import cbor2
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from bench.common import Progress, machine
from device_drivers.outbox import Outbox
from device_drivers.relay import Relay, RelayConfig
from gateway.broker import MosquittoBroker
from gateway.processes import until
from ingest import keys
from ingest.envelope import open_envelope, seal
from ingest.model import Payload, Reading, Receipt
from ingest.pipeline import down_topic, up_topic
from ingest.receipts import RECEIPT_ACCEPTED, seal_receipt
from ingest.transport import stop_client

BATCH_SIZES = (1, 10, 100)
T0_MS = 1_795_000_000_000
# The relay's pace for this benchmark: the shipped default tick (0.2 s) with 20 in flight
# caps a hub at 100 envelopes/s, which would measure the policy, not the code.
BENCH_TICK_S = 0.005
POLL_S = 0.002
DRAIN_TIMEOUT_S = 300.0


def _readings(first: int, n: int) -> list[Reading]:
    return [
        Reading(T0_MS + (first + i) * 1000, "heart_rate", 60.0 + (first + i) % 40, "/min", "hr-1")
        for i in range(n)
    ]


def _device(size: int) -> str:
    """One device (and so one broker session, one seq space) per configuration."""
    return f"hub-bench-{size}"


def _payloads(envelopes: int, size: int) -> list[Payload]:
    return [
        Payload(
            dev=_device(size),
            seq=k + 1,
            sent_ms=T0_MS,
            readings=tuple(_readings(k * size, size)),
            gaps=(),
            sensors=(),
        )
        for k in range(envelopes)
    ]


def _plain(payload: Payload) -> dict[str, Any]:
    """The payload as the protocol lays it out, built without any of the codec's checks."""
    return {
        "v": payload.v,
        "dev": payload.dev,
        "seq": payload.seq,
        "sent": payload.sent_ms,
        "r": [[r.t_ms, r.metric, r.value, r.unit, r.sensor] for r in payload.readings],
        "gaps": [],
    }


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def sealing(
    workdir: Path, envelopes: int, size: int, key: ec.EllipticCurvePrivateKey, say: Progress
) -> dict[str, Any]:
    payloads = _payloads(envelopes, size)
    plain = [_plain(p) for p in payloads]
    t0 = time.perf_counter()
    for obj in plain:
        cbor2.dumps(obj)
    cbor_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for payload in payloads:
        seal(payload, key)
    memory_s = time.perf_counter() - t0
    path = workdir / f"seal-{size}.sqlite"
    with Outbox.open(path, _device(size)) as outbox:
        for k in range(0, envelopes * size, 10_000):
            outbox.add_readings(_readings(k, min(10_000, envelopes * size - k)))
        t0 = time.perf_counter()
        sealed = outbox.seal_pending(key, T0_MS, size)
        outbox_s = time.perf_counter() - t0
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    assert len(sealed) == envelopes, (len(sealed), envelopes)
    result = {
        "batch_size": size,
        "envelopes": envelopes,
        "baseline_cbor_envelopes_per_s": _rate(envelopes, cbor_s),
        "seal_in_memory_envelopes_per_s": _rate(envelopes, memory_s),
        "outbox_seal_pending_envelopes_per_s": _rate(envelopes, outbox_s),
        "outbox_seal_pending_readings_per_s": _rate(envelopes * size, outbox_s),
        "ratio_to_baseline": round(cbor_s / outbox_s, 4),
        "in_memory_ratio_to_baseline": round(cbor_s / memory_s, 4),
    }
    say(
        f"sealing size {size}: {result['outbox_seal_pending_envelopes_per_s']:,} envelopes/s "
        f"(cbor2 alone {result['baseline_cbor_envelopes_per_s']:,}/s)"
    )
    return result


class Receipter:
    """The benchmark's gateway stand-in: receipts every envelope it sees, signed."""

    def __init__(self, broker: MosquittoBroker, gateway_key: ec.EllipticCurvePrivateKey) -> None:
        self._key = gateway_key
        self.receipted = 0
        self._ready = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="bench-receipter",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise TimeoutError("the receipting subscriber did not subscribe")

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe(up_topic("+"), qos=1)

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        payload = open_envelope(bytes(msg.payload)).payload
        receipt = Receipt(
            payload.dev,
            payload.seq,
            RECEIPT_ACCEPTED,
            len(payload.readings),
            0,
            int(time.time() * 1000),
        )
        client.publish(down_topic(payload.dev), seal_receipt(receipt, self._key), qos=1)
        self.receipted += 1

    def close(self) -> None:
        stop_client(self.client)


async def _relay_run(
    broker: MosquittoBroker,
    path: Path,
    size: int,
    envelopes: int,
    key: ec.EllipticCurvePrivateKey,
    gateway_key: ec.EllipticCurvePrivateKey,
) -> tuple[float, list[bytes]]:
    device = f"relay-{_device(size)}"
    with Outbox.open(path, device) as outbox:
        for k in range(0, envelopes * size, 10_000):
            outbox.add_readings(_readings(k, min(10_000, envelopes * size - k)))
        outbox.seal_pending(key, T0_MS, size)
        data = [e.data for e in outbox.due(2**62, 0, envelopes)]
        config = RelayConfig(
            device, broker.host, broker.port, seal_max_readings=size, tick_s=BENCH_TICK_S
        )
        relay = Relay(config, outbox, key, gateway_key.public_key())
        task = asyncio.create_task(relay.run(), name="bench-relay")
        try:
            await until(
                lambda: relay.stats.connected, "the relay connected", DRAIN_TIMEOUT_S, POLL_S
            )
            t0 = time.perf_counter()
            await until(
                lambda: relay.stats.receipts_accepted >= envelopes,
                "all receipted",
                DRAIN_TIMEOUT_S,
                POLL_S,
            )
            seconds = time.perf_counter() - t0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = outbox.stats().unreceipted_envelopes
    if left:
        raise RuntimeError(f"{left} envelopes left in the outbox after the run")
    return seconds, data


def _raw_publish(broker: MosquittoBroker, data: list[bytes]) -> float:
    done = threading.Event()
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(data):
            done.set()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-raw",
        protocol=mqtt.MQTTv5,
    )
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        topic = up_topic("raw-baseline")
        t0 = time.perf_counter()
        for item in data:
            info = client.publish(topic, item, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"raw publish refused: {info.rc}")
        if not done.wait(DRAIN_TIMEOUT_S):
            raise TimeoutError("raw baseline: PUBACKs missing")
        return time.perf_counter() - t0
    finally:
        stop_client(client)


async def relaying(
    broker: MosquittoBroker,
    workdir: Path,
    envelopes: int,
    size: int,
    key: ec.EllipticCurvePrivateKey,
    gateway_key: ec.EllipticCurvePrivateKey,
    say: Progress,
) -> dict[str, Any]:
    path = workdir / f"relay-{size}.sqlite"
    receipter = Receipter(broker, gateway_key)
    try:
        relay_s, data = await _relay_run(broker, path, size, envelopes, key, gateway_key)
    finally:
        receipter.close()
    raw_s = await asyncio.to_thread(_raw_publish, broker, data)
    result = {
        "batch_size": size,
        "envelopes": envelopes,
        "envelope_bytes_mean": round(sum(map(len, data)) / len(data)),
        "baseline_raw_qos1_readings_per_s": _rate(envelopes * size, raw_s),
        "relay_receipted_readings_per_s": _rate(envelopes * size, relay_s),
        "relay_receipted_envelopes_per_s": _rate(envelopes, relay_s),
        "ratio_to_baseline": round(raw_s / relay_s, 4),
    }
    say(
        f"relaying size {size}: {result['relay_receipted_readings_per_s']:,} readings/s "
        f"(raw QoS 1 {result['baseline_raw_qos1_readings_per_s']:,}/s)"
    )
    return result


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (fsync costs differ a lot between them)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


@contextlib.contextmanager
def _workdir(parent: Path | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trialstream-bench-hub-", dir=parent) as d:
        yield Path(d)


async def run(
    *,
    seal_envelopes: int = 2_000,
    relay_envelopes: int = 1_000,
    sizes: tuple[int, ...] = BATCH_SIZES,
    workdir: Path | None = None,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    key = keys.generate_private_key()
    gateway_key = keys.generate_private_key()
    with _workdir(workdir) as work:
        say(f"outbox files in {work} ({_filesystem(work)})")
        seals = [sealing(work, seal_envelopes, size, key, say) for size in sizes]
        broker = MosquittoBroker(work / "mosquitto")
        await asyncio.to_thread(broker.start)
        try:
            relays = [
                await relaying(broker, work, relay_envelopes, size, key, gateway_key, say)
                for size in sizes
            ]
        finally:
            await asyncio.to_thread(broker.stop)
        fs = _filesystem(work)
    return {
        "benchmark": "hub",
        "machine": machine(),
        "outbox_filesystem": fs,
        "sealing": {
            "method": "Outbox.seal_pending of pending readings in one call (synchronous=FULL)",
            "baseline": "cbor2.dumps of the same payloads as plain lists/maps",
            "also": "ingest.envelope.seal in memory (checks, CBOR, ES256), no SQLite",
            "sizes": seals,
        },
        "relaying": {
            "method": (
                "Relay draining already sealed envelopes through a local Mosquitto, each "
                "receipted by an in-process subscriber signing with a gateway key; from "
                f"connected to all receipted; tick {BENCH_TICK_S} s, 20 in flight"
            ),
            "baseline": "bare paho QoS 1 publish of the same bytes until every PUBACK",
            "sizes": relays,
        },
    }
