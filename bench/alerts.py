"""``trialstream bench alerts``: how fast an alert reaches a monitor's page, and what people
watching the pages cost the ingest path, measured against the same gateway in the same run.

Set-up: a scratch database (created on the given server and dropped at the end) with one
study, ``hubs`` load hubs and ``PROBE_HUBS`` probe hubs (participants with consent), a study
alert rule ``heart_rate > 150`` opening on the first breaching reading, a monitor and a
clinician account; a private Mosquitto; the gateway as its own process (``trialstream
gateway --workers 1``: one worker, so its ``/metrics`` counter of committed readings is the
whole gateway's). Load envelopes (``READINGS_PER_ENVELOPE`` in-range heart-rate readings,
round-robin over the load hubs) are sealed by a publisher process before any timing and
published at QoS 1.

1. **Peak**: committed readings/s while the gateway has a backlog (the publisher pushes a
   batch of envelopes far faster than the gateway takes them; the rate is measured between
   10% and 90% of the batch committed, from the gateway's own counter).
2. **Latency**: with the load paced at half the peak, probes are published every
   ``PROBE_INTERVAL_S`` from the probe hubs, each a single reading that opens that
   participant's alert (150 exceeded) or clears it (back in range); each is timed from
   ``publish()`` to its event (``opened`` or ``resolved``) arriving on a monitor's
   ``/api/v1/alerts/events`` stream read by an aiohttp client in this process (one clock).
   Once with only that monitor connected, once with ``clients`` more connected.
3. **Clients**: peak readings/s with 0 and with ``clients`` connected people, alternated
   ``CLIENT_ROUNDS`` times: half monitors holding an alert stream open, half clinicians
   following a load participant's live view as ``live.js`` does (its stream sends the
   10-minute window whole, about 600 readings of 1 Hz heart rate, then what the gateway
   stores as it arrives, and the window again every minute), each with a session of its
   own, while a feeder stores 1 Hz heart rate for every watched participant so the streams
   carry what a streaming wearable would give them; each reading's delay from being stored
   to reaching its clinician is reported. The result is the ratio of the medians. The
   people run in a process of their own, whose CPU use is reported (on this machine their
   client work shares the gateway's two cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import paho.mqtt.client as mqtt
import psutil  # type: ignore[import-untyped]
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from bench.common import (
    METRICS_HEADERS,
    METRICS_TOKEN,
    BenchHub,
    Progress,
    add_consented_hub,
    cpu_seconds,
    create_study,
    database_name,
    machine,
    recorded_mode,
    scratch_database,
)
from gateway.broker import MosquittoBroker, free_port
from gateway.web.auth import COOKIE
from ingest.envelope import seal
from ingest.model import Payload, Reading
from ingest.pipeline import up_topic
from ingest.transport import stop_client
from storage import alerts, db, sessions, users
from storage.migrate import StorageMode, migrate
from storage.partitions import ensure_partitions, partition_start_ms
from storage.timeconv import to_ms
from storage.users import Role

HUBS = 100
PROBE_HUBS = 20
CLIENTS = 200
PROBES = 200
PROBE_INTERVAL_S = 0.1
READINGS_PER_ENVELOPE = 10
READING_STEP_MS = 100
# The load's reading times start this far back, so they stay out of the live view's window
# (the last 10 minutes), which holds what a wearable at 1 Hz sends (prefilled: LIVE_*).
LOAD_START_AGO_MS = 3 * 3_600_000
LIVE_MINUTES = 10
LIVE_HZ = 1
# Throughput runs per condition (0 and N people, alternated); the median of each counts.
CLIENT_ROUNDS = 3
HIGH = 150.0
# The people connect over this long, not all at once.
CONNECT_SPREAD_S = 2.0
TARGET_P99_MS = 500.0
TARGET_MAX_SLOWDOWN = 0.10
# Envelopes of the first peak measurement, which sizes the later batches.
CALIBRATION_ENVELOPES = 2_000
# A probe whose event has not arrived after this long counts as lost.
EVENT_TIMEOUT_S = 10.0
# Envelopes the publisher may have unacknowledged by the broker.
PUBLISH_WINDOW = 1_000
SAMPLE_EVERY_S = 0.05
PASSWORD = "bench password, not a secret"


@dataclass
class _LiveSeen:
    """What the clinicians' live streams delivered: windows, increments (readings in each)
    and each new reading's delay from being stored (its time) to reaching the client."""

    windows: int = 0
    increments: list[int] = field(default_factory=list)
    delays_ms: list[float] = field(default_factory=list)

    def add(self, other: _LiveSeen) -> None:
        self.windows += other.windows
        self.increments.extend(other.increments)
        self.delays_ms.extend(other.delays_ms)


@dataclass
class _Trial:
    url: str
    load: list[BenchHub]
    probes: list[BenchHub]
    monitor_tokens: list[str] = field(default_factory=list)
    clinician_tokens: list[str] = field(default_factory=list)
    # Per probe hub, across runs: the last sequence number sent (a repeated one would be a
    # duplicate, stored once) and whether its alert is open.
    probe_seqs: dict[str, int] = field(default_factory=dict)
    probe_open: dict[str, bool] = field(default_factory=dict)
    # What the live views got, across runs.
    live: _LiveSeen = field(default_factory=lambda: _LiveSeen())


# --- the scratch trial ----------------------------------------------------------------------


async def _create_trial(url: str, hubs: int, clients: int) -> _Trial:
    now = datetime.now(UTC)
    async with db.connection(url, autocommit=True) as conn:
        report = await migrate(conn)
        if report.mode is StorageMode.PLAIN:
            day = 86_400_000
            await ensure_partitions(
                conn, {partition_start_ms(to_ms(now) + k * day) for k in range(-1, 3)}
            )
    trial = _Trial(url, [], [])
    async with db.connection(url) as conn:
        async with conn.transaction():
            doc = await create_study(conn, "Alerts benchmark", now)
            for i in range(hubs + PROBE_HUBS):
                probe = i >= hubs
                pid = f"AP{i:04d}" if probe else f"LP{i:04d}"
                dev = f"alert-probe-{i:04d}" if probe else f"load-hub-{i:04d}"
                hub = await add_consented_hub(conn, doc, pid, dev, now)
                (trial.probes if probe else trial.load).append(hub)
        await _prefill_live(conn, trial.load, now)
        await alerts.add_rule(
            conn,
            study_id="BENCH",
            name="hr-high",
            metric="heart_rate",
            high=HIGH,
            created_by="bench",
        )
        people = {}
        for name, role in (("bench-monitor", Role.MONITOR), ("bench-clinician", Role.CLINICIAN)):
            people[role] = await users.create_user(
                conn,
                actor="bench",
                username=name,
                display_name=name,
                role=role,
                password=PASSWORD,
                sites=["BENCH-SITE"],
            )
        await conn.commit()
        # A session per connected person, as each browser would have (made directly: the
        # benchmark is about the pages, not about signing in).
        async with conn.transaction():
            for _ in range(clients // 2 + 1):
                s = await sessions.create_session(conn, people[Role.MONITOR].user_id)
                trial.monitor_tokens.append(s.token)
            for _ in range(clients - clients // 2):
                s = await sessions.create_session(conn, people[Role.CLINICIAN].user_id)
                trial.clinician_tokens.append(s.token)
    return trial


async def _prefill_live(conn: db.Conn, hubs: list[BenchHub], now: datetime) -> None:
    """The last LIVE_MINUTES of 1 Hz heart rate for each load participant, stored as one
    envelope (seq 0) each: what a clinician's live view then reads on every poll."""
    n = LIVE_MINUTES * 60 * LIVE_HZ
    start = now - timedelta(minutes=LIVE_MINUTES)
    async with conn.transaction():
        for h in hubs:
            await conn.execute(
                "INSERT INTO envelopes (device_id, seq, participant_id, sent_at, received_at,"
                " envelope_sha256, reading_count, stored_count, refused_count)"
                " VALUES (%s, 0, %s, %s, %s, %s, %s, %s, 0)",
                (h.device_id, h.participant_id, now, now, os.urandom(32), n, n),
            )
            async with conn.cursor().copy(_COPY_LIVE) as copy:
                for i in range(n):
                    t = start + timedelta(seconds=i / LIVE_HZ)
                    await copy.write_row(_live_row(h, t, 60.0 + i % 30, now))


_COPY_LIVE = (
    "COPY readings (time, participant_id, metric, value, unit, device_id, seq, sensor,"
    " received_at) FROM STDIN"
)


def _live_row(hub: BenchHub, t: datetime, value: float, received: datetime) -> tuple[object, ...]:
    """A heart-rate reading of the live data, in the prefilled envelope (seq 0)."""
    return (t, hub.participant_id, "heart_rate", value, "/min", hub.device_id, 0, "hr-1", received)


# --- the load publisher (a process of its own) ---------------------------------------------


def _publisher_main(conn: Connection, hubs: list[BenchHub], host: str, port: int) -> None:
    """Seals load envelopes on command, then publishes them at a rate or as fast as it can."""
    loaded = [(h.device_id, h.key()) for h in hubs]
    seqs = [0] * len(loaded)
    t0_ms = int(time.time() * 1000) - LOAD_START_AGO_MS
    pool: list[tuple[str, bytes]] = []
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        if cmd[0] == "seal":
            pool = []
            for n in range(cmd[1]):
                i = n % len(loaded)
                dev, key = loaded[i]
                seqs[i] += 1
                base = t0_ms + seqs[i] * READINGS_PER_ENVELOPE * READING_STEP_MS
                readings = tuple(
                    Reading(
                        base + k * READING_STEP_MS,
                        "heart_rate",
                        60.0 + (n + k) % 30,
                        "/min",
                        "hr-1",
                    )
                    for k in range(READINGS_PER_ENVELOPE)
                )
                payload = Payload(
                    dev, seqs[i], base + READINGS_PER_ENVELOPE * READING_STEP_MS, readings
                )
                pool.append((up_topic(dev), seal(payload, key)))
            conn.send(len(pool))
        else:
            _, rate = cmd
            conn.send(_publish(pool, host, port, rate))


def _publish(
    pool: list[tuple[str, bytes]], host: str, port: int, rate: float | None
) -> tuple[int, float]:
    """Publish ``pool`` in order, at ``rate`` envelopes/s or unpaced; (count, seconds)."""
    window = threading.BoundedSemaphore(PUBLISH_WINDOW)
    connected = threading.Event()
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-alerts-load-{os.getpid()}-{time.monotonic_ns()}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(PUBLISH_WINDOW)
    client.max_queued_messages_set(0)
    client.on_connect = lambda *_: connected.set()
    client.on_publish = lambda *_: window.release()
    client.connect(host, port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError("the load publisher could not connect")
        start = time.monotonic()
        for sent, (topic, body) in enumerate(pool):
            if rate is not None:
                delay = start + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            window.acquire()
            info = client.publish(topic, body, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish refused rc={info.rc}")
        for _ in range(PUBLISH_WINDOW):  # every one acknowledged by the broker
            window.acquire()
        return len(pool), time.monotonic() - start
    finally:
        stop_client(client)


class _Publisher:
    def __init__(self, hubs: list[BenchHub], broker: MosquittoBroker) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_publisher_main, args=(child, hubs, broker.host, broker.port), daemon=True
        )
        self._proc.start()

    async def seal(self, envelopes: int) -> None:
        self._conn.send(("seal", envelopes))
        await asyncio.to_thread(self._conn.recv)

    def start_publishing(self, rate: float | None) -> asyncio.Future[tuple[int, float]]:
        self._conn.send(("publish", rate))
        return asyncio.ensure_future(asyncio.to_thread(self._conn.recv))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


# --- the gateway (a process of its own) ----------------------------------------------------


@contextlib.contextmanager
def _gateway(url: str, broker: MosquittoBroker, workdir: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIALSTREAM_")}
    env.update(
        TRIALSTREAM_DATABASE_URL=url,
        TRIALSTREAM_MQTT_HOST=broker.host,
        TRIALSTREAM_MQTT_PORT=str(broker.port),
        TRIALSTREAM_DATA_DIR=str(workdir / "gateway"),
        TRIALSTREAM_HTTP_PORT=str(port),
        TRIALSTREAM_STORAGE_MODE=str(recorded_mode(url)),
        TRIALSTREAM_LOG_LEVEL="WARNING",
        TRIALSTREAM_METRICS_TOKEN=METRICS_TOKEN,
    )
    with (workdir / "gateway.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "gateway", "--workers", "1"],
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _stored(http: aiohttp.ClientSession, base: str) -> int | None:
    """The gateway's count of committed readings, or None while it does not answer."""
    try:
        async with http.get(f"{base}/metrics", headers=METRICS_HEADERS) as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return None
    connected = stored = None
    for line in text.splitlines():
        if line.startswith("trialstream_readings_stored_total{"):
            stored = int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("trialstream_mqtt_connected{"):
            connected = line.endswith(" 1")
    return stored if connected else None


async def _wait_ready(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 60
    while await _stored(http, base) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not connect within 60 s")
        await asyncio.sleep(0.1)


# --- connected people -----------------------------------------------------------------------


def _cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={token}"}


async def _events(
    http: aiohttp.ClientSession, base: str, token: str, ready: asyncio.Event
) -> AsyncIterator[dict[str, Any]]:
    """The alert events of a monitor's stream, as they arrive."""
    async with http.get(f"{base}/api/v1/alerts/events?after=0", headers=_cookie(token)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"alert stream refused: {resp.status} {await resp.text()}")
        ready.set()
        async for line in resp.content:
            if line.startswith(b"data: "):
                yield json.loads(line[6:])


async def _monitor(
    http: aiohttp.ClientSession, base: str, token: str, ready: asyncio.Event
) -> None:
    async for _ in _events(http, base, token, ready):
        pass


async def _clinician(
    http: aiohttp.ClientSession,
    base: str,
    token: str,
    participant: str,
    ready: asyncio.Event,
    seen: _LiveSeen,
) -> None:
    """Follows a participant's live stream as live.js does."""
    path = f"{base}/api/v1/participants/{participant}/readings/live?minutes={LIVE_MINUTES}"
    async with http.get(path, headers=_cookie(token)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"live view refused: {resp.status} {await resp.text()}")
        name = b""
        async for line in resp.content:
            if line.startswith(b"event: "):
                name = line[7:].strip()
            elif line.startswith(b"data: "):
                body = json.loads(line[6:])
                if name == b"window":
                    seen.windows += 1
                    ready.set()
                elif name == b"readings":
                    now = time.time() * 1000
                    seen.increments.append(len(body["readings"]))
                    seen.delays_ms.extend(now - r["t"] for r in body["readings"])
                else:
                    raise RuntimeError(f"live view ended: {name.decode()}")


async def _live_feed(url: str, hubs: list[BenchHub]) -> None:
    """Until cancelled: a 1 Hz heart rate for each watched participant, received now, so
    the live views' polls after the first find what a streaming wearable would give them.
    Stored directly (one COPY a second), not through the gateway whose throughput is being
    measured."""
    async with db.connection(url) as conn:
        i = 0
        while True:
            now = datetime.now(UTC)
            async with conn.transaction(), conn.cursor().copy(_COPY_LIVE) as copy:
                for h in hubs:
                    await copy.write_row(_live_row(h, now, 60.0 + i % 30, now))
            i += 1
            await asyncio.sleep(1 / LIVE_HZ)


@contextlib.asynccontextmanager
async def _people(
    http: aiohttp.ClientSession, base: str, trial: _Trial, count: int
) -> AsyncIterator[None]:
    """``count`` people on the pages (half monitors, half clinicians), all connected."""
    readies: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    watched = trial.load[: min(len(trial.load), count // 2)]
    feed = (
        asyncio.create_task(_live_feed(trial.url, watched), name="bench-live-feed")
        if watched
        else None
    )
    for i in range(count):
        ready = asyncio.Event()
        readies.append(ready)
        if i % 2 == 0:
            token = trial.monitor_tokens[1 + i // 2]
            coro = _monitor(http, base, token, ready)
        else:
            token = trial.clinician_tokens[i // 2]
            participant = trial.load[(i // 2) % len(trial.load)].participant_id
            coro = _clinician(http, base, token, participant, ready, trial.live)
        tasks.append(asyncio.create_task(coro, name=f"bench-person-{i}"))
        await asyncio.sleep(CONNECT_SPREAD_S / max(count, 1))
    try:
        async with asyncio.timeout(60):
            for ready, task in zip(readies, tasks, strict=True):
                done, _ = await asyncio.wait(
                    [task, asyncio.ensure_future(ready.wait())], return_when="FIRST_COMPLETED"
                )
                if task in done:
                    task.result()  # raises what went wrong
        yield
    finally:
        everything = [*tasks, *([feed] if feed is not None else [])]
        for task in everything:
            task.cancel()
        for task in everything:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await task


@dataclass(frozen=True, slots=True)
class _CrowdReport:
    live: _LiveSeen
    cpu_s: float
    wall_s: float

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def _crowd_main(conn: Connection, base: str, trial: _Trial, count: int) -> None:
    """The connected people, in a process of their own: their client work (HTTP, JSON,
    SSE parsing) must neither delay the latency probe's event loop nor hide in its CPU."""

    trial.live = _LiveSeen()  # this crowd's own: the parent adds it to what came before

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            try:
                async with _people(http, base, trial, count):
                    cpu, wall = time.process_time(), time.monotonic()
                    conn.send(("ready", None))
                    await asyncio.to_thread(conn.recv)  # until told to stop
                    report = _CrowdReport(
                        trial.live,
                        time.process_time() - cpu,
                        time.monotonic() - wall,
                    )
            except Exception as exc:  # reported to the parent, which raises
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                return
        conn.send(("done", report))

    asyncio.run(main())


@contextlib.asynccontextmanager
async def _crowd(base: str, trial: _Trial, count: int) -> AsyncIterator[list[_CrowdReport]]:
    """``count`` people connected (in a child process) while the block runs; the list it
    yields gets the crowd's report when the block ends."""
    reports: list[_CrowdReport] = []
    if count == 0:
        yield reports
        return
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_crowd_main, args=(child, base, trial, count), daemon=True)
    proc.start()
    try:
        kind, detail = await asyncio.to_thread(conn.recv)
        if kind != "ready":
            raise RuntimeError(f"the people could not connect: {detail}")
        yield reports
        conn.send("stop")
        kind, detail = await asyncio.to_thread(conn.recv)
        if kind != "done":
            raise RuntimeError(f"the people failed: {detail}")
        reports.append(detail)
        trial.live.add(detail.live)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# --- measurements ---------------------------------------------------------------------------


def _gateway_and_database() -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The gateway's processes (started by this benchmark) and PostgreSQL's."""
    gateway = [
        p
        for p in psutil.Process().children(recursive=True)
        if any("gateway.cli" in part for part in _cmdline(p))
    ]
    gateway += [c for p in gateway for c in p.children(recursive=True)]
    database = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
    return gateway, database


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return list(process.cmdline())
    except psutil.Error:
        return []


async def _peak(
    http: aiohttp.ClientSession, base: str, publisher: _Publisher, envelopes: int
) -> dict[str, Any]:
    """Committed readings/s while the gateway works through a backlog of ``envelopes``, and
    the CPU the gateway and PostgreSQL used meanwhile (% of one core)."""
    await publisher.seal(envelopes)
    gateway, database = _gateway_and_database()
    cpu0 = (cpu_seconds(gateway), cpu_seconds(database), time.monotonic())
    total = envelopes * READINGS_PER_ENVELOPE
    first = await _stored(http, base)
    assert first is not None
    publishing = publisher.start_publishing(None)
    samples: list[tuple[float, int]] = []
    published_at: float | None = None
    deadline = time.monotonic() + 600
    while True:
        now = time.monotonic()
        got = await _stored(http, base)
        if got is not None:
            samples.append((now, got - first))
            if got - first >= total:
                break
        if published_at is None and publishing.done():
            published_at = now
        if now > deadline:
            raise RuntimeError(f"only {samples[-1][1]} of {total} readings within 600 s")
        await asyncio.sleep(SAMPLE_EVERY_S)
    sent, _ = await publishing
    published_at = published_at or time.monotonic()
    t10 = next(t for t, n in samples if n >= total * 0.1)
    n10 = next(n for t, n in samples if n >= total * 0.1)
    t90, n90 = next((t, n) for t, n in samples if n >= total * 0.9)
    wall = time.monotonic() - cpu0[2]
    return {
        "readings": total,
        "envelopes": sent,
        "readings_per_s": round((n90 - n10) / (t90 - t10), 1),
        "gateway_cpu_pct": round(100 * (cpu_seconds(gateway) - cpu0[0]) / wall, 1),
        "postgres_cpu_pct": round(100 * (cpu_seconds(database) - cpu0[1]) / wall, 1),
        # The publisher ahead of the gateway for the whole window: a backlog all along.
        "backlog_in_window": published_at <= t90,
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latency(
    http: aiohttp.ClientSession,
    base: str,
    trial: _Trial,
    broker: MosquittoBroker,
    publisher: _Publisher,
    *,
    load_envelopes_per_s: float,
    probes: int,
    people: int,
) -> dict[str, Any]:
    duration = probes * PROBE_INTERVAL_S + 5
    await publisher.seal(int(load_envelopes_per_s * duration))
    pending: dict[tuple[str, str], float] = {}
    arrived: dict[tuple[str, str], asyncio.Event] = {}
    latencies: list[float] = []
    ready = asyncio.Event()

    async def watch() -> None:
        async for ev in _events(http, base, trial.monitor_tokens[0], ready):
            key = (ev["participant_id"], ev["event"])
            sent = pending.pop(key, None)
            if sent is not None:
                latencies.append(time.perf_counter() - sent)
                arrived[key].set()

    connected = threading.Event()
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-alerts-probe-{os.getpid()}",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = lambda *_: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    watcher = asyncio.create_task(watch(), name="bench-alert-watcher")
    lost = 0
    try:
        if not await asyncio.to_thread(connected.wait, 10):
            raise TimeoutError("the probe publisher could not connect")
        async with asyncio.timeout(30):
            await ready.wait()
        async with _crowd(base, trial, people) as crowd:
            publishing = publisher.start_publishing(load_envelopes_per_s)
            hubs = [(h, h.key()) for h in trial.probes]
            last: list[asyncio.Event | None] = [None] * len(hubs)
            start = time.monotonic()
            for n in range(probes):
                i = n % len(hubs)
                hub, key = hubs[i]
                previous = last[i]
                if previous is not None:
                    try:
                        async with asyncio.timeout(EVENT_TIMEOUT_S):
                            await previous.wait()
                    except TimeoutError:
                        lost += 1
                        pending.clear()
                delay = start + n * PROBE_INTERVAL_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                dev = hub.device_id
                seq = trial.probe_seqs[dev] = trial.probe_seqs.get(dev, 0) + 1
                is_open = trial.probe_open.get(dev, False)
                trial.probe_open[dev] = not is_open
                now_ms = int(time.time() * 1000)
                value = 70.0 if is_open else HIGH + 50.0
                event = "resolved" if is_open else "opened"
                body = seal(
                    Payload(
                        dev,
                        seq,
                        now_ms,
                        (Reading(now_ms, "heart_rate", value, "/min", "hr-1"),),
                    ),
                    key,
                )
                k = (hub.participant_id, event)
                arrived[k] = asyncio.Event()
                last[i] = arrived[k]
                pending[k] = time.perf_counter()
                client.publish(up_topic(hub.device_id), body, qos=1)
            for e in last:
                if e is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(EVENT_TIMEOUT_S):
                            await e.wait()
            lost += len(pending)
            await publishing
    finally:
        watcher.cancel()
        # aiohttp reports a read cancelled mid-line as a timeout.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await watcher
        stop_client(client)
    ms = [s * 1000 for s in latencies]
    return {
        "people_connected": people + 1,
        "people_process_cpu_pct": round(crowd[0].cpu_pct, 1) if crowd else 0.0,
        "load_readings_per_s": round(load_envelopes_per_s * READINGS_PER_ENVELOPE, 1),
        "probes": probes,
        "events_timed": len(ms),
        "lost": lost,
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(_percentile(ms, 0.99), 1) if ms else None,
        "max_ms": round(max(ms), 1) if ms else None,
        "target_p99_ms": TARGET_P99_MS,
        "met": bool(ms) and lost == 0 and _percentile(ms, 0.99) < TARGET_P99_MS,
    }


async def _clients(
    http: aiohttp.ClientSession,
    base: str,
    trial: _Trial,
    publisher: _Publisher,
    *,
    envelopes: int,
    people: int,
    say: Progress,
) -> dict[str, Any]:
    runs = []
    for count in (0, people) * CLIENT_ROUNDS:
        async with _crowd(base, trial, count) as crowd:
            got = await _peak(http, base, publisher, envelopes)
        cpu = round(crowd[0].cpu_pct, 1) if crowd else 0.0
        say(
            f"clients: {count} connected -> {got['readings_per_s']:,.0f} readings/s"
            f" (CPU, % of a core: gateway {got['gateway_cpu_pct']}, PostgreSQL"
            f" {got['postgres_cpu_pct']}, the people {cpu})"
        )
        runs.append({"people_connected": count, "people_process_cpu_pct": cpu, **got})
    without = statistics.median(r["readings_per_s"] for r in runs if r["people_connected"] == 0)
    with_people = statistics.median(
        r["readings_per_s"] for r in runs if r["people_connected"] == people
    )
    ratio = with_people / without
    return {
        "runs": runs,
        "without_readings_per_s": round(without, 1),
        "with_readings_per_s": round(with_people, 1),
        "ratio": round(ratio, 3),
        "slowdown": round(1 - ratio, 3),
        "target_max_slowdown": TARGET_MAX_SLOWDOWN,
        "met": 1 - ratio <= TARGET_MAX_SLOWDOWN,
    }


async def run(
    server_url: str,
    *,
    hubs: int = HUBS,
    clients: int = CLIENTS,
    probes: int = PROBES,
    seconds: float = 6.0,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    publisher: _Publisher | None = None
    async with scratch_database(server_url, "trialstream_bench_alerts") as url:
        say(f"scratch database {database_name(url)}: {hubs} load hubs, {PROBE_HUBS} probe hubs")
        trial = await _create_trial(url, hubs, clients)
        with tempfile.TemporaryDirectory(prefix="trialstream-bench-alerts-") as tmp:
            work = Path(tmp)
            broker = MosquittoBroker(work / "mosquitto")
            broker.start()
            try:
                publisher = _Publisher(trial.load, broker)
                with _gateway(url, broker, work) as base:
                    connector = aiohttp.TCPConnector(limit=0)
                    # Streams stay open for whole runs: no total time limit per request.
                    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
                    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                        await _wait_ready(http, base)
                        say("gateway ready; calibrating the peak")
                        calibration = await _peak(http, base, publisher, CALIBRATION_ENVELOPES)
                        rate = calibration["readings_per_s"] / READINGS_PER_ENVELOPE
                        batch = max(CALIBRATION_ENVELOPES, int(rate * seconds))
                        peak = await _peak(http, base, publisher, batch)
                        say(f"peak: {peak['readings_per_s']:,.0f} readings/s")
                        half = peak["readings_per_s"] / READINGS_PER_ENVELOPE / 2
                        latency = []
                        for people in (0, clients):
                            got = await _latency(
                                http,
                                base,
                                trial,
                                broker,
                                publisher,
                                load_envelopes_per_s=half,
                                probes=probes,
                                people=people,
                            )
                            say(
                                f"latency with {people + 1} connected: p50 {got['p50_ms']} ms,"
                                f" p99 {got['p99_ms']} ms, lost {got['lost']}"
                            )
                            latency.append(got)
                        crowd = await _clients(
                            http, base, trial, publisher, envelopes=batch, people=clients, say=say
                        )
            finally:
                if publisher is not None:
                    publisher.close()
                broker.stop()
    return {
        "benchmark": "alerts",
        "machine": machine(),
        "config": {
            "load_hubs": hubs,
            "probe_hubs": PROBE_HUBS,
            "readings_per_envelope": READINGS_PER_ENVELOPE,
            "gateway_workers": 1,
            "people": clients,
            "probes": probes,
            "probe_interval_s": PROBE_INTERVAL_S,
            "live_view": "server-sent events (readings/live), window whole every minute",
        },
        "peak": peak,
        "latency": latency,
        "clients": crowd,
        "live_views": {
            "windows": trial.live.windows,
            "increments": len(trial.live.increments),
            "mean_readings_per_increment": round(statistics.fmean(trial.live.increments), 1)
            if trial.live.increments
            else None,
            "delay_ms_p50": round(_percentile(trial.live.delays_ms, 0.5))
            if trial.live.delays_ms
            else None,
            "delay_ms_p99": round(_percentile(trial.live.delays_ms, 0.99))
            if trial.live.delays_ms
            else None,
        },
    }
