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
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import cbor2
import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg import conninfo, sql

from bench.common import (
    METRICS_HEADERS,
    METRICS_TOKEN,
    BenchHub,
    Progress,
    add_consented_hub,
    create_study,
    machine,
)
from bench.mqtt_raw import MAX_PACKET_ID, RawClient, RawMqttError
from gateway.broker import MosquittoBroker, free_port
from gateway.consumer import SHARED_SUBSCRIPTION
from ingest.envelope import seal
from ingest.model import Payload, Reading
from ingest.transport import stop_client
from storage import db
from storage.migrate import StorageMode, migrate
from storage.partitions import ensure_partitions, partition_start_ms
from storage.timeconv import from_ms
from storage.writer import EpochMsDumper

SIZES = (1, 10, 100)
HUBS = 200
PUBLISHERS = 3
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
# Envelopes a publisher may have unacknowledged by the broker (its own flow control).
PUBLISH_WINDOW = 1000
# The database slowed down: every envelope insert statement sleeps this long.
SLOW_STATEMENT_S = 0.5
# Envelopes/s published while the database is slowed: more than two workers can store then
# (a batch of at most 500 per 0.5 s each), so the gateway is held back the whole window,
# and little enough that the broker's backlog stays modest over a 10-minute window.
SLOW_RATE = 2_500.0
READING_STEP_MS = 10
SESSION_EXPIRY_S = 3600
REFERENCE_SUBSCRIPTION = "$share/bench/dct/v1/+/up"
BARE_MAX_BATCH = 500
BARE_MAX_WAIT_S = 0.05

# Base values; each reading adds 0-6, so every one is in range (SpO2 at most 99 %) and the
# gateway is measured on the same stored readings as the references.
_METRICS = (("heart_rate", "/min", 72.0), ("spo2", "%", 93.0))


# --- the scratch trial ----------------------------------------------------------------------


async def _create_trial(url: str, hubs: int, t0_ms: int, span_ms: int) -> list[BenchHub]:
    now = datetime.now(UTC)
    out: list[BenchHub] = []
    async with db.connection(url, autocommit=True) as conn:
        report = await migrate(conn)
        if report.mode is StorageMode.PLAIN:
            starts = {partition_start_ms(t) for t in range(t0_ms, t0_ms + span_ms, 86_400_000)}
            starts.add(partition_start_ms(t0_ms + span_ms))
            await ensure_partitions(conn, starts)
    async with db.connection(url) as conn, conn.transaction():
        doc = await create_study(conn, "Ingest benchmark", now)
        for i in range(hubs):
            hub = await add_consented_hub(conn, doc, f"BP{i:04d}", f"bench-hub-{i:04d}", now)
            out.append(hub)
    return out


# --- publishers (separate processes) --------------------------------------------------------


def _seal_pool(hubs: Sequence[BenchHub], size: int, per_hub: int, t0_ms: int) -> list[bytes]:
    loaded = [(h.device_id, h.key()) for h in hubs]
    pool: list[bytes] = []
    for seq in range(1, per_hub + 1):
        for dev, key in loaded:
            base = t0_ms + (seq - 1) * size * READING_STEP_MS
            readings = tuple(
                Reading(
                    base + i * READING_STEP_MS,
                    _METRICS[i % 2][0],
                    _METRICS[i % 2][2] + (seq + i) % 7,
                    _METRICS[i % 2][1],
                    "wrist-1",
                )
                for i in range(size)
            )
            pool.append(seal(Payload(dev, seq, base + size * READING_STEP_MS, readings), key))
    return pool


def _publisher_main(
    conn: Connection, hubs: list[BenchHub], size: int, per_hub: int, t0_ms: int, name: str
) -> None:
    pool = _seal_pool(hubs, size, per_hub, t0_ms)
    topics = [f"dct/v1/{h.device_id}/up" for h in hubs]
    conn.send(len(pool))
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        host, port, rate, start_at, duration, cycle = cmd
        conn.send(_publish(pool, topics, host, port, rate, start_at, duration, name, cycle))


def _publish(
    pool: list[bytes],
    topics: list[str],
    host: str,
    port: int,
    rate: float | None,
    start_at: float,
    duration: float,
    name: str,
    cycle: bool = False,
) -> tuple[int, list[tuple[int, float]]]:
    """Publish ``pool`` in order from ``start_at`` for ``duration`` s (QoS 1, through
    :mod:`bench.mqtt_raw`: the load costs the machine little); at ``rate`` msg/s, or as fast
    as the broker acknowledges when None. ``cycle``: start the pool over when it
    runs out (the gateway stores each envelope once and receipts the copies again). Returns
    the count and, when paced and not cycling, the monotonic time of each publish (by pool
    index)."""
    client = RawClient(host, port, f"bench-pub-{name}-{os.getpid()}-{time.monotonic_ns()}")
    window = min(PUBLISH_WINDOW, client.receive_maximum)
    names = [RawClient.topic_name(t) for t in topics]
    times: list[tuple[int, float]] = []
    sent = inflight = packet_id = 0

    def take_acks(within_s: float) -> None:
        nonlocal inflight
        acked, _ = client.poll(within_s)
        inflight -= len(acked)

    try:
        while time.monotonic() < start_at:
            time.sleep(0.001)
        end = start_at + duration
        n_topics = len(names)
        limit = sys.maxsize if cycle else len(pool)
        while sent < limit:
            now = time.monotonic()
            if now >= end:
                break
            due = limit if rate is None else min(limit, int((now - start_at) * rate) + 1)
            while sent < due and inflight < window:
                packet_id = packet_id % MAX_PACKET_ID + 1  # in flight: at most `window` ids
                t = time.monotonic()
                client.publish(names[sent % n_topics], pool[sent % len(pool)], packet_id)
                inflight += 1
                if rate is not None and not cycle:
                    times.append((sent, t))
                sent += 1
                if rate is None and sent % 256 == 0:
                    take_acks(0)
                    if time.monotonic() >= end:
                        break
            # Paced: wait for the next due publish (an acknowledgement wakes it earlier).
            take_acks(0.001 if rate is not None or inflight >= window else 0)
        # Every message counted as sent is acknowledged by the broker before the client
        # goes: one unacknowledged at disconnect would read as a missing receipt.
        drained = time.monotonic() + 10
        while inflight > 0:
            if time.monotonic() > drained:
                raise TimeoutError("the broker did not acknowledge every publish within 10 s")
            take_acks(0.05)
    finally:
        client.close()
    return sent, times


class _Publishers:
    def __init__(self, hubs: Sequence[BenchHub], size: int, count: int, t0_ms: int) -> None:
        ctx = mp.get_context("spawn")
        n = PUBLISHERS
        shares = [list(hubs[i::n]) for i in range(n)]
        per_hub = max(1, -(-count // len(hubs)))
        self.per_hub = per_hub
        self.shares = shares
        self._pipes: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for i, share in enumerate(shares):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_publisher_main,
                args=(child, share, size, per_hub, t0_ms, f"{size}-{i}"),
                name=f"bench-publisher-{i}",
            )
            p.start()
            self._pipes.append(parent)
            self._procs.append(p)
        self.sealed = sum(int(pipe.recv()) for pipe in self._pipes)

    def run(
        self, host: str, port: int, rate: float | None, duration: float, *, cycle: bool = False
    ) -> tuple[int, float, dict[tuple[str, int], float]]:
        """Publish (at ``rate`` msg/s in all, or full speed; ``cycle``: the pools over and
        over); returns the count, the start time and, when paced, publish times by
        (device, seq)."""
        start_at = time.monotonic() + 0.5
        share_rate = None if rate is None else rate / len(self._pipes)
        for pipe in self._pipes:
            pipe.send((host, port, share_rate, start_at, duration, cycle))
        total = 0
        times: dict[tuple[str, int], float] = {}
        for pipe, share in zip(self._pipes, self.shares, strict=True):
            sent, stamps = pipe.recv()
            total += sent
            for index, t in stamps:
                times[(share[index % len(share)].device_id, index // len(share) + 1)] = t
        return total, start_at, times

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


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


def _reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE readings, envelopes, rejections, gaps, sensors")
        conn.execute("VACUUM ANALYZE envelopes")


# The parts of the machine whose CPU time a drain window and the latency run report.
_CPU_PARTS = ("consumer", "broker", "database", "other")


def _process_tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class _Cpu:
    """CPU time spent over a window, by part: the consumer's processes (given by their
    roots, with their children), the broker, the database server, and the rest of the
    machine; and how busy the machine's cores were.

    Processes are read at both ends of the window; one born inside it counts from zero, one
    that died inside it is missed (none do: consumers, broker and database backends live
    through the window)."""

    def __init__(self, consumer_roots: Sequence[int]) -> None:
        self._roots = list(consumer_roots)
        self._start = self._snapshot()
        self._machine0 = psutil.cpu_times()
        self._t0 = time.monotonic()

    def _consumer_pids(self) -> set[int]:
        pids: set[int] = set()
        for pid in self._roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids.update(p.pid for p in _process_tree(psutil.Process(pid)))
        return pids

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        consumers = self._consumer_pids()
        out: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                name = proc.info["name"] or ""
                if proc.pid in consumers:
                    part = "consumer"
                elif name == "mosquitto":
                    part = "broker"
                elif name == "postgres":
                    part = "database"
                else:
                    part = "other"
                out[proc.pid] = (part, _cpu_seconds(proc))
        return out

    def summary(self, envelopes: float) -> dict[str, Any]:
        """CPU microseconds per envelope committed in the window, by part; cores busy."""
        end = self._snapshot()
        elapsed = time.monotonic() - self._t0
        m1 = psutil.cpu_times()
        idle = (m1.idle + getattr(m1, "iowait", 0.0)) - (
            self._machine0.idle + getattr(self._machine0, "iowait", 0.0)
        )
        by_part: dict[str, float] = dict.fromkeys(_CPU_PARTS, 0.0)
        for pid, (part, seconds) in end.items():
            before = self._start.get(pid)
            by_part[part] += seconds - (before[1] if before and before[0] == part else 0.0)
        per = 1e6 / envelopes if envelopes > 0 else 0.0
        out: dict[str, Any] = {
            f"{part}_us_per_envelope": round(by_part[part] * per, 1) for part in _CPU_PARTS
        }
        out["total_us_per_envelope"] = round(sum(by_part.values()) * per, 1)
        out["cores_busy"] = round(psutil.cpu_count() - idle / elapsed, 2) if elapsed else None
        return out


class _Memory:
    """Samples the resident set of a process tree in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self._root = psutil.Process(pid)
        self._interval = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (time, total, largest worker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                procs = _process_tree(self._root)
                rss = []
                for p in procs:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rss.append(p.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self.samples.append((time.monotonic(), sum(rss), max(rss[1:], default=0)))

    def __enter__(self) -> _Memory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, start: float, end: float) -> dict[str, Any]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {}
        third = max(1, len(inside) // 3)
        mib = 1024 * 1024
        return {
            "peak_total_mib": round(max(s[1] for s in inside) / mib, 1),
            "peak_worker_mib": round(max(s[2] for s in inside) / mib, 1),
            "first_third_peak_total_mib": round(max(s[1] for s in inside[:third]) / mib, 1),
            "last_third_peak_total_mib": round(max(s[1] for s in inside[-third:]) / mib, 1),
        }


@contextlib.contextmanager
def _gateway(
    url: str, broker: MosquittoBroker, workdir: Path, workers: int
) -> Iterator[tuple[int, int]]:
    """The gateway's processes: (supervisor pid, HTTP port) once every worker is connected."""
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    env.update(
        {
            "TRIALSTREAM_DATABASE_URL": url,
            "TRIALSTREAM_MQTT_HOST": broker.host,
            "TRIALSTREAM_MQTT_PORT": str(broker.port),
            "TRIALSTREAM_DATA_DIR": str(workdir / "gateway"),
            "TRIALSTREAM_HTTP_PORT": str(http_port),
            "TRIALSTREAM_STORAGE_MODE": "plain",
            "TRIALSTREAM_LOG_LEVEL": "WARNING",
            "TRIALSTREAM_METRICS_TOKEN": METRICS_TOKEN,
        }
    )
    log = (workdir / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "gateway", "--workers", str(workers)],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        _wait_workers(proc, http_port, workers)
        yield proc.pid, http_port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _scrape(http_port: int, workers: int) -> dict[str, str]:
    """The /metrics text of each worker, by worker label (each scrape lands on one)."""
    texts: dict[str, str] = {}
    deadline = time.monotonic() + 30
    while len(texts) < workers and time.monotonic() < deadline:
        scrape = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/metrics", headers=METRICS_HEADERS
        )
        with urllib.request.urlopen(scrape, timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("trialstream_messages_total{"):
                texts[line.split('"')[1]] = text
    return texts


def _inside_gateway(texts: Mapping[str, str]) -> dict[str, Any]:
    """What the workers' own histograms say of the same run: where a receipt's time went
    between the message's arrival at a worker and its receipt (bucket bounds, so a
    quantile reads "at most"), mean seconds per batch phase, and messages per batch."""
    receipt: Counter[float] = Counter()
    sums: dict[str, float] = {}
    counts: Counter[str] = Counter()
    messages = batches = failures = 0
    for text in texts.values():
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("trialstream_receipt_duration_seconds_bucket{"):
                le = name.split('le="')[1].rstrip('"}')
                receipt[math.inf if le == "+Inf" else float(le)] += int(value)
            elif name.startswith("trialstream_batch_duration_seconds_sum{"):
                phase = name.split('phase="')[1].split('"')[0]
                sums[phase] = sums.get(phase, 0.0) + float(value)
            elif name.startswith("trialstream_batch_duration_seconds_count{"):
                counts[name.split('phase="')[1].split('"')[0]] += int(value)
            elif name.startswith("trialstream_messages_total{"):
                messages += int(value)
            elif name.startswith("trialstream_batches_total{"):
                batches += int(value)
            elif name.startswith("trialstream_receipt_publish_failures_total{"):
                failures += int(value)
    total = receipt[math.inf]

    def at_most_ms(q: float) -> float | None:
        for bound in sorted(receipt):
            if total and receipt[bound] >= q * total:
                return None if bound == math.inf else bound * 1000
        return None

    return {
        "receipt_ms_at_most": {"p50": at_most_ms(0.5), "p99": at_most_ms(0.99)},
        "batch_phase_mean_ms": {
            phase: round(sums[phase] / counts[phase] * 1000, 1) for phase in counts if counts[phase]
        },
        "messages_per_batch": round(messages / batches, 1) if batches else None,
        "messages": messages,
        "receipt_publish_failures": failures,
    }


def _wait_workers(proc: subprocess.Popen[bytes], http_port: int, workers: int) -> None:
    """Until every worker reports an MQTT connection on /metrics (each scrape lands on one)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while len(seen) < workers:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway workers did not connect within 60 s")
        try:
            scrape = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/metrics", headers=METRICS_HEADERS
            )
            with urllib.request.urlopen(scrape, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            time.sleep(0.1)
            continue
        for line in text.splitlines():
            if line.startswith("trialstream_mqtt_connected{") and line.endswith(" 1"):
                seen.add(line.split('"')[1])
        time.sleep(0.05)


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


class _Receipts:
    """Subscribes to every device's downlink and stamps each receipt's arrival (a thread of
    its own on a :mod:`bench.mqtt_raw` connection)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self._error: Exception | None = None
        self._client = RawClient(broker.host, broker.port, f"bench-receipts-{os.getpid()}")
        # QoS 1: a QoS 0 subscriber may be dropped messages by a busy broker, which would
        # read as receipts the gateway never sent.
        try:
            self._client.subscribe("dct/v1/+/down")
        except BaseException:
            self._client.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="bench-receipts", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            while not self._stop.is_set():
                _, got = self._client.poll(0.1)
                if got:
                    t = time.monotonic()
                    self.arrivals.extend((t, payload) for _, payload in got)
                self._client.ping_if_idle()
        except (RawMqttError, OSError) as exc:
            self._error = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()
        if self._error is not None:
            raise RuntimeError(f"receipt listener failed: {self._error}") from self._error

    def by_envelope(self) -> dict[tuple[str, int], tuple[float, int]]:
        out: dict[tuple[str, int], tuple[float, int]] = {}
        for t, data in self.arrivals:
            # [receipt, COSE Receipt] (docs/protocol.md section 5); the signature is the
            # hubs' business, the benchmark only needs which envelope each one answers.
            body = cbor2.loads(cbor2.loads(data)[0])
            key = (str(body["dev"]), int(body["seq"]))
            if key not in out:
                out[key] = (t, int(body["stored"]))
        return out


@dataclass
class _Window:
    readings_per_s: float
    published: int
    committed_at_end: int
    backlog_at_end: bool


def _live_window(
    url: str,
    publishers: _Publishers,
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
    cpu = _Cpu(consumer_roots)
    time.sleep(seconds)
    c1, t1 = _count(url), time.monotonic()
    used = cpu.summary((c1 - c0) / size)
    return _Window((c1 - c0) / (t1 - t0), backlog_readings, c1, c1 < backlog_readings), used


# --- the benchmark --------------------------------------------------------------------------


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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
    pubs = _Publishers(hubs, size, count, t0_ms)
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
            _reset(url)
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

        _reset(url)
        broker = fresh_broker()
        try:
            _prime(broker, [f"trialstream-gw-{i}" for i in range(workers)], SHARED_SUBSCRIPTION)
            backlog = pubs.run(broker.host, broker.port, None, BACKLOG_MAX_S)[0]
            with _gateway(url, broker, workdir, workers) as (pid, _), _Memory(pid) as mem:
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
        _reset(url)
        rate = latency_rate or max(1.0, w.readings_per_s / 2 / size)
        broker = fresh_broker()
        try:
            with _gateway(url, broker, workdir, workers) as (pid, port), _Memory(pid) as mem:
                receipts = _Receipts(broker)
                m0 = time.monotonic()
                half_cpu = _Cpu([pid])
                sent, _, published = pubs.run(broker.host, broker.port, rate, seconds)
                # The publishers and the receipt listener count as "other" here.
                half_cpu_used = half_cpu.summary(sent)
                deadline = time.monotonic() + 30
                while len(receipts.by_envelope()) < sent and time.monotonic() < deadline:
                    time.sleep(0.2)
                half_memory = mem.summary(m0, time.monotonic())
                inside = _inside_gateway(_scrape(port, workers))
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
                "p50": round(_quantile(latencies, 0.5), 1) if latencies else None,
                "p99": round(_quantile(latencies, 0.99), 1) if latencies else None,
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
            _reset(url)
            _slow_database(url, True)
            broker = fresh_broker()
            try:
                with (
                    _gateway(url, broker, workdir, workers) as (pid, port),
                    _Memory(pid) as mem,
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
                    slow_inside = _inside_gateway(_scrape(port, workers))
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
    scratch = f"trialstream_bench_ingest_{os.getpid()}"
    async with db.connection(server_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
        cur = await admin.execute("SHOW server_version")
        version = await cur.fetchone()
    url = conninfo.make_conninfo(server_url, dbname=scratch)
    results: list[dict[str, Any]] = []
    try:
        t0_ms = int((time.time() - 86_400) * 1000)
        simulated = await _create_trial(url, hubs, t0_ms - 86_400_000, 3 * 86_400_000)
        say(f"scratch database {scratch}: {hubs} hubs, participants consented")
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
    finally:
        async with db.connection(server_url, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch))
            )
    return {
        "benchmark": "ingest",
        "machine": machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "postgresql": str(version[0]) if version else None,
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
