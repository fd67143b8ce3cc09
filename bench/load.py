"""The load of the benchmarks that go through the gateway: a scratch trial of consented
hubs, and envelopes sealed for them before any timing (``ingest.envelope.seal``), published
at QoS 1 by publisher processes through :mod:`bench.mqtt_raw` (the load costs the machine
little), at a fixed rate or as fast as the broker acknowledges."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from multiprocessing.connection import Connection

import psycopg

from bench.common import BenchHub, add_consented_hub, create_study
from bench.mqtt_raw import MAX_PACKET_ID, Login, RawClient
from ingest.envelope import seal
from ingest.model import Payload, Reading
from storage import db
from storage.migrate import StorageMode, migrate
from storage.partitions import ensure_partitions, partition_start_ms

PUBLISHERS = 3
# Envelopes a publisher may have unacknowledged by the broker (its own flow control).
PUBLISH_WINDOW = 1000
READING_STEP_MS = 10

# Base values; each reading adds 0-6, so every one is in range (SpO2 at most 99 %) and the
# gateway is measured on the same stored readings as the references.
_METRICS = (("heart_rate", "/min", 72.0), ("spo2", "%", 93.0))


# --- the scratch trial ----------------------------------------------------------------------


async def create_trial(url: str, hubs: int, t0_ms: int, span_ms: int) -> list[BenchHub]:
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


def seal_pool(hubs: Sequence[BenchHub], size: int, per_hub: int, t0_ms: int) -> list[bytes]:
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
    pool = seal_pool(hubs, size, per_hub, t0_ms)
    topics = [f"dct/v1/{h.device_id}/up" for h in hubs]
    conn.send(len(pool))
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        host, port, rate, start_at, duration, cycle, login = cmd
        conn.send(
            publish(pool, topics, host, port, rate, start_at, duration, name, cycle, login=login)
        )


def publish(
    pool: list[bytes],
    topics: list[str],
    host: str,
    port: int,
    rate: float | None,
    start_at: float,
    duration: float,
    name: str,
    cycle: bool = False,
    *,
    login: Login | None = None,
) -> tuple[int, list[tuple[int, float]]]:
    """Publish ``pool`` in order from ``start_at`` for ``duration`` s (QoS 1, through
    :mod:`bench.mqtt_raw`: the load costs the machine little); at ``rate`` msg/s, or as fast
    as the broker acknowledges when None. ``cycle``: start the pool over when it
    runs out (the gateway stores each envelope once and receipts the copies again). Returns
    the count and, when paced and not cycling, the monotonic time of each publish (by pool
    index)."""
    client = RawClient(
        host, port, f"bench-pub-{name}-{os.getpid()}-{time.monotonic_ns()}", login=login
    )
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


class Publishers:
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
        self,
        host: str,
        port: int,
        rate: float | None,
        duration: float,
        *,
        cycle: bool = False,
        start_at: float | None = None,
        login: Login | None = None,
    ) -> tuple[int, float, dict[tuple[str, int], float]]:
        """Publish (at ``rate`` msg/s in all, or full speed; ``cycle``: the pools over and
        over) from ``start_at`` (``time.monotonic()``; default: in 0.5 s) for ``duration``
        s, logging in with ``login`` (default: MQTT 5, no credentials); returns the count,
        the start time and, when paced, publish times by (device, seq)."""
        if start_at is None:
            start_at = time.monotonic() + 0.5
        share_rate = None if rate is None else rate / len(self._pipes)
        for pipe in self._pipes:
            pipe.send((host, port, share_rate, start_at, duration, cycle, login))
        total = 0
        times: dict[tuple[str, int], float] = {}
        for pipe, share in zip(self._pipes, self.shares, strict=True):
            sent, stamps = pipe.recv()
            total += sent
            for index, t in stamps:
                times[(share[index % len(share)].device_id, index // len(share) + 1)] = t
        return total, start_at, times

    def close(self) -> None:
        stop_processes(self._pipes, self._procs)


def stop_processes(pipes: Sequence[Connection], procs: Sequence[mp.process.BaseProcess]) -> None:
    """Tell each publisher process to end (None on its pipe), then wait; kill a straggler."""
    for pipe in pipes:
        with contextlib.suppress(OSError):
            pipe.send(None)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE readings, envelopes, envelope_originals, device_records, rejections,"
            " gaps, sensors, adherence_deltas, adherence_slots, adherence_days"
        )
        conn.execute("VACUUM ANALYZE envelopes")
