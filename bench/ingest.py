"""``trialstream bench ingest``: the gateway end to end against the bare path and a naive
subscriber, on the same load, in the same run.

Load: envelopes from many simulated hubs (devices, participants and consent created in a
scratch database), sealed with ``ingest.envelope.seal`` before any timing, published at QoS 1
by several publisher processes into a private Mosquitto (plain loopback mode) started fresh
for every measurement, so no backlog crosses from one to the next.

Consumers, each run as its own processes (``workers`` of them, sharing one subscription):

- ``gateway``: ``python -m gateway.cli gateway --workers N``: verification, consent,
  dedupe, one transaction per batch, ack and signed receipt after COMMIT;
- ``bare``: paho -> CBOR decode -> binary COPY of the rows, one transaction per batch; no
  verification, consent, dedupe or receipts: the ceiling of any consumer on this machine;
- ``naive``: paho -> INSERT per reading, commit per message.

Throughput is committed readings per second over a window while the consumer has a backlog
(``count(*)`` of ``readings`` at both ends of the window). Latency (gateway only) is from
``publish()`` to the receipt's arrival on ``dct/v1/<dev>/down``, at half the gateway's
measured peak rate (or at a fixed rate, ``--latency-rate``, to compare builds at one
load). Memory is the resident set of the gateway's processes, sampled with psutil: at peak,
at half peak, and with the database slowed down (a statement trigger that sleeps on every
envelope insert) while the publishers keep pushing at full speed. Each drain window also
records the CPU time the consumer's processes, the broker and PostgreSQL spent per envelope
committed (``cpu``): with both cores busy, the ratio of two methods' totals is the ratio of
their throughputs. The latency run records the same per envelope published, with the
publishers and the receipt listener in ``other``, and how busy the cores were meanwhile.

The load and its publishers are :mod:`bench.load`; the gateway's processes, its receipts and
the CPU and memory read of them are :mod:`bench.gateway_process` (shared with ``bench
memory`` and ``bench login-flood``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import cbor2
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import (
    BenchHub,
    Progress,
    database_name,
    machine,
    recorded_mode,
    scratch_database,
    server_version,
)
from bench.gateway_process import (
    Cpu,
    Memory,
    Receipts,
    gateway_processes,
    inside_gateway,
    quantile,
    scrape,
)
from bench.load import PUBLISHERS, Publishers, create_trial, reset
from gateway.broker import MosquittoBroker
from gateway.consumer import SHARED_SUBSCRIPTION
from ingest.transport import stop_client
from storage.timeconv import from_ms
from storage.writer import EpochMsDumper

SIZES = (1, 10, 100)
HUBS = 200
WORKERS = 2
# The window starts this long after the publishers do: consumers connected, pools warm,
# a backlog at the broker.
WARMUP_S = 1.5
# Readings a publisher pool is sized for, per second of window, by envelope size: a little
# above the bare path's rate here, so every consumer still has a backlog at the window's end
# (the result says when one did not: ``backlog_at_end``).
POOL_READINGS_PER_S = {1: 30_000, 10: 200_000, 100: 500_000}
# Filling the backlog stops after this long whatever is left of the pool.
BACKLOG_MAX_S = 120.0
# The database slowed down: every envelope insert statement sleeps this long.
SLOW_STATEMENT_S = 0.5
# Envelopes/s published while the database is slowed: more than two workers can store then
# (a batch of at most 500 per 0.5 s each), so the gateway is held back the whole window,
# and little enough that the broker's backlog stays modest over a 10-minute window.
SLOW_RATE = 2_500.0
SESSION_EXPIRY_S = 3600
REFERENCE_SUBSCRIPTION = "$share/bench/dct/v1/+/up"
BARE_MAX_BATCH = 500
BARE_MAX_WAIT_S = 0.05

# --- the reference consumers (separate processes) -------------------------------------------


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


def _prime(broker: MosquittoBroker, client_ids: Sequence[str], subscription: str) -> None:
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


# --- one measurement ------------------------------------------------------------------------


def _count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM readings").fetchone()
    return int(row[0]) if row else 0


def _refused(url: str) -> int:
    """Readings the gateway refused (rejection rows' counts): the load is all valid, so
    anything here means the gateway and the references did not store the same work."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(sum(reading_count), 0) FROM rejections").fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def _reference(kind: str, url: str, broker: MosquittoBroker, workers: int) -> Iterator[list[int]]:
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


@dataclass
class _Window:
    readings_per_s: float
    published: int
    committed_at_end: int
    backlog_at_end: bool


def _live_window(
    url: str,
    publishers: Publishers,
    broker: MosquittoBroker,
    seconds: float,
    size: int,
    rate: float | None = None,
    every_minute: Callable[[], None] | None = None,
) -> _Window:
    """Publishing at ``rate`` envelopes/s (None: full speed), the pools over and over;
    committed readings/s over the window after the warm-up, with ``every_minute`` called
    each minute of it."""
    result: dict[str, Any] = {}

    def publish() -> None:
        result["run"] = publishers.run(
            broker.host, broker.port, rate, WARMUP_S + seconds + 1, cycle=True
        )

    thread = threading.Thread(target=publish, name="bench-publish")
    thread.start()
    time.sleep(0.5 + WARMUP_S)
    c0, t0 = _count(url), time.monotonic()
    while (left := t0 + seconds - time.monotonic()) > 0:
        time.sleep(min(left, 60.0))
        if every_minute is not None and left > 60.0:
            every_minute()
    c1, t1 = _count(url), time.monotonic()
    thread.join()
    published = int(result["run"][0])
    return _Window((c1 - c0) / (t1 - t0), published, c1, c1 < published * size)


def _drain_window(
    url: str, seconds: float, backlog_readings: int, consumer_roots: Sequence[int], size: int
) -> tuple[_Window, dict[str, Any]]:
    """Committed readings/s while a consumer drains a backlog (no publisher competing), and
    the CPU time each part of the machine spent per envelope committed meanwhile."""
    time.sleep(WARMUP_S)
    c0, t0 = _count(url), time.monotonic()
    cpu = Cpu(consumer_roots)
    time.sleep(seconds)
    c1, t1 = _count(url), time.monotonic()
    used = cpu.summary((c1 - c0) / size)
    return _Window((c1 - c0) / (t1 - t0), backlog_readings, c1, c1 < backlog_readings), used


# --- the benchmark --------------------------------------------------------------------------


def _slow_database(url: str, on: bool) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if on:
            conn.execute(
                "CREATE OR REPLACE FUNCTION bench_slow() RETURNS trigger LANGUAGE plpgsql AS"
                f" $$BEGIN PERFORM pg_sleep({SLOW_STATEMENT_S}); RETURN NULL; END$$"
            )
            conn.execute(
                "CREATE TRIGGER bench_slow AFTER INSERT ON envelopes"
                " FOR EACH STATEMENT EXECUTE FUNCTION bench_slow()"
            )
        else:
            conn.execute("DROP TRIGGER IF EXISTS bench_slow ON envelopes")


def _run_size(
    url: str,
    hubs: list[BenchHub],
    size: int,
    seconds: float,
    workers: int,
    workdir: Path,
    say: Progress,
    *,
    slow_db: bool,
    slow_seconds: float,
    latency_rate: float | None,
) -> dict[str, Any]:
    pool_readings = int(POOL_READINGS_PER_S.get(size, 420_000) * (WARMUP_S + seconds + 1))
    count = max(len(hubs), pool_readings // size)
    t0_ms = int((time.time() - 86_400) * 1000)
    say(f"size {size}: sealing {count:,} envelopes in {PUBLISHERS} publisher processes")
    pubs = Publishers(hubs, size, count, t0_ms)
    out: dict[str, Any] = {"readings_per_envelope": size, "envelopes_sealed": pubs.sealed}
    run_no = 0

    def fresh_broker() -> MosquittoBroker:
        nonlocal run_no
        run_no += 1
        broker = MosquittoBroker(workdir / f"mosquitto-{size}-{run_no}")
        broker.start()
        return broker

    try:
        for kind in ("bare", "naive"):
            reset(url)
            broker = fresh_broker()
            try:
                _prime(
                    broker, [f"bench-{kind}-{i}" for i in range(workers)], REFERENCE_SUBSCRIPTION
                )
                backlog = pubs.run(broker.host, broker.port, None, BACKLOG_MAX_S)[0]
                with _reference(kind, url, broker, workers) as pids:
                    w, cpu = _drain_window(url, seconds, backlog * size, pids, size)
            finally:
                broker.kill()
            out[kind] = {
                "readings_per_s": round(w.readings_per_s),
                "backlog_at_end": w.backlog_at_end,
                "cpu": cpu,
            }
            say(f"size {size}: {kind} {w.readings_per_s:,.0f} readings/s; cpu {cpu}")

        reset(url)
        broker = fresh_broker()
        try:
            _prime(broker, [f"trialstream-gw-{i}" for i in range(workers)], SHARED_SUBSCRIPTION)
            backlog = pubs.run(broker.host, broker.port, None, BACKLOG_MAX_S)[0]
            with gateway_processes(url, broker, workdir, workers) as (pid, _), Memory(pid) as mem:
                m0 = time.monotonic()
                w, cpu = _drain_window(url, seconds, backlog * size, [pid], size)
                peak_memory = mem.summary(m0, time.monotonic())
            refused = _refused(url)
        finally:
            broker.kill()
        bare = out["bare"]["readings_per_s"] or 1
        naive = out["naive"]["readings_per_s"] or 1
        out["gateway"] = {
            "readings_per_s": round(w.readings_per_s),
            "backlog_at_end": w.backlog_at_end,
            "ratio_to_bare": round(w.readings_per_s / bare, 2),
            "ratio_to_naive": round(w.readings_per_s / naive, 1),
            "readings_refused": refused,
            "memory_at_peak": peak_memory,
            "cpu": cpu,
        }
        out["naive"]["ratio_to_bare"] = round(naive / bare, 3)
        say(
            f"size {size}: gateway {w.readings_per_s:,.0f} readings/s "
            f"({w.readings_per_s / bare:.2f}x bare, {w.readings_per_s / naive:.1f}x naive); "
            f"cpu {cpu}"
        )

        # Latency at half the gateway's peak, or at the rate asked for.
        reset(url)
        rate = latency_rate or max(1.0, w.readings_per_s / 2 / size)
        broker = fresh_broker()
        try:
            with (
                gateway_processes(url, broker, workdir, workers) as (pid, port),
                Memory(pid) as mem,
            ):
                receipts = Receipts(broker)
                m0 = time.monotonic()
                half_cpu = Cpu([pid])
                sent, _, published = pubs.run(broker.host, broker.port, rate, seconds)
                # The publishers and the receipt listener count as "other" here.
                half_cpu_used = half_cpu.summary(sent)
                deadline = time.monotonic() + 30
                while len(receipts.by_envelope()) < sent and time.monotonic() < deadline:
                    time.sleep(0.2)
                half_memory = mem.summary(m0, time.monotonic())
                inside = inside_gateway(scrape(port, workers))
                receipts.close()
        finally:
            broker.kill()
        got = receipts.by_envelope()
        latencies = [
            (got[k][0] - t) * 1000 for k, t in published.items() if k in got and got[k][0] >= t
        ]
        out["gateway"]["at_half_peak"] = {
            "envelopes_per_s": round(rate, 1),
            "fixed_rate": latency_rate is not None,
            "envelopes": sent,
            "receipts": sum(1 for k in published if k in got),
            "latency_ms": {
                "p50": round(quantile(latencies, 0.5), 1) if latencies else None,
                "p99": round(quantile(latencies, 0.99), 1) if latencies else None,
                "max": round(max(latencies), 1) if latencies else None,
                "mean": round(statistics.fmean(latencies), 1) if latencies else None,
            },
            "memory": half_memory,
            "cpu": half_cpu_used,
            "inside_gateway": inside,
        }
        say(
            f"size {size}: at {rate:,.0f} envelopes/s p50 "
            f"{out['gateway']['at_half_peak']['latency_ms']['p50']} ms, p99 "
            f"{out['gateway']['at_half_peak']['latency_ms']['p99']} ms; inside the gateway "
            f"{inside}"
        )

        if slow_db:
            reset(url)
            _slow_database(url, True)
            broker = fresh_broker()
            try:
                with (
                    gateway_processes(url, broker, workdir, workers) as (pid, port),
                    Memory(pid) as mem,
                ):
                    m0 = time.monotonic()
                    w = _live_window(
                        url,
                        pubs,
                        broker,
                        slow_seconds,
                        size,
                        SLOW_RATE,
                        lambda: say(
                            f"size {size}: database slowed, memory so far "
                            f"{mem.summary(m0, time.monotonic())}"
                        ),
                    )
                    slow_memory = mem.summary(m0, time.monotonic())
                    slow_inside = inside_gateway(scrape(port, workers))
            finally:
                broker.kill()
                _slow_database(url, False)
            out["gateway"]["database_slowed"] = {
                "statement_delay_s": SLOW_STATEMENT_S,
                "window_s": slow_seconds,
                "publish_rate_envelopes_per_s": SLOW_RATE,
                "readings_per_s": round(w.readings_per_s),
                "backlog_at_end": w.backlog_at_end,
                "memory": slow_memory,
                "inside_gateway": slow_inside,
            }
            say(
                f"size {size}: database slowed, {w.readings_per_s:,.0f} readings/s, receipts"
                f" refused {slow_inside.get('receipt_publish_failures')}, memory {slow_memory}"
            )
    finally:
        pubs.close()
    return out


async def run(
    server_url: str,
    *,
    seconds: float = 4.0,
    slow_seconds: float | None = None,
    latency_rate: float | None = None,
    sizes: Sequence[int] = SIZES,
    workers: int = WORKERS,
    hubs: int = HUBS,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    results: list[dict[str, Any]] = []
    async with scratch_database(server_url, "trialstream_bench_ingest") as url:
        version = await server_version(url)
        t0_ms = int((time.time() - 86_400) * 1000)
        simulated = await create_trial(url, hubs, t0_ms - 86_400_000, 3 * 86_400_000)
        mode = recorded_mode(url)
        say(
            f"scratch database {database_name(url)} ({mode} mode): {hubs} hubs,"
            " participants consented"
        )
        with tempfile.TemporaryDirectory(prefix="trialstream-bench-ingest-") as tmp:
            results.extend(
                _run_size(
                    url,
                    simulated,
                    size,
                    seconds,
                    workers,
                    Path(tmp),
                    say,
                    slow_db=size == 10 or len(sizes) == 1,
                    slow_seconds=seconds * 2 if slow_seconds is None else slow_seconds,
                    latency_rate=latency_rate,
                )
                for size in sizes
            )
    return {
        "benchmark": "ingest",
        "machine": machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "postgresql": version,
        "mode": str(mode),
        "method": {
            "window_s": seconds,
            "warmup_s": WARMUP_S,
            "hubs": hubs,
            "publisher_processes": PUBLISHERS,
            "consumer_processes": workers,
            "broker": "private Mosquitto, plain loopback, fresh per measurement",
            "throughput": "committed readings/s over the window (count(*) at both ends)",
            "bare": "paho -> CBOR decode -> binary COPY per batch (no verify/consent/dedupe)",
            "naive": "paho -> INSERT per reading, commit per message",
            "latency": "publish() -> receipt arrival, at half the gateway's peak rate"
            if latency_rate is None
            else f"publish() -> receipt arrival, at {latency_rate:g} envelopes/s (fixed)",
            "database_slowed": f"every envelope INSERT sleeps {SLOW_STATEMENT_S} s while"
            f" {SLOW_RATE:,.0f} envelopes/s are published",
        },
        "results": results,
    }
