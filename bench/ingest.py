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

The load and its publishers are :mod:`bench.load`; the reference consumers
:mod:`bench.ingest_references`; the gateway's processes, its receipts and the CPU and memory
read of them are :mod:`bench.gateway_process` (shared with ``bench memory`` and ``bench
login-flood``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psycopg

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
    gateway_processes,
    inside_gateway,
    receipt_latency,
    scrape,
)
from bench.ingest_amqp import RabbitTarget, fresh_uplink, rabbit_target
from bench.ingest_references import REFERENCE_SUBSCRIPTION, prime, reference
from bench.load import PUBLISHERS, Publishers, create_trial, reset
from gateway.broker import MosquittoBroker
from gateway.consumer import SHARED_SUBSCRIPTION

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
    url: str,
    seconds: float,
    backlog_readings: int,
    consumer_roots: Sequence[int],
    size: int,
    broker_roots: Sequence[int] = (),
) -> tuple[_Window, dict[str, Any]]:
    """Committed readings/s while a consumer drains a backlog (no publisher competing), and
    the CPU time each part of the machine spent per envelope committed meanwhile."""
    time.sleep(WARMUP_S)
    c0, t0 = _count(url), time.monotonic()
    cpu = Cpu(consumer_roots, broker_roots)
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
    rabbit: RabbitTarget | None = None,
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
                prime(broker, [f"bench-{kind}-{i}" for i in range(workers)], REFERENCE_SUBSCRIPTION)
                backlog = pubs.run(broker.host, broker.port, None, BACKLOG_MAX_S)[0]
                with reference(kind, url, broker, workers) as pids:
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
            prime(broker, [f"trialstream-gw-{i}" for i in range(workers)], SHARED_SUBSCRIPTION)
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

        if rabbit is not None:
            out["gateway_amqp"] = _amqp_drain(url, rabbit, pubs, seconds, size, workdir, workers)
            out["gateway_amqp"]["ratio_to_mqtt"] = round(
                out["gateway_amqp"]["readings_per_s"] / max(1, out["gateway"]["readings_per_s"]),
                2,
            )
            out["gateway_amqp"]["ratio_to_bare"] = round(
                out["gateway_amqp"]["readings_per_s"] / bare, 2
            )
            say(f"size {size}: gateway over RabbitMQ {out['gateway_amqp']}")

        # Latency at half the gateway's peak, or at the rate asked for.
        reset(url)
        rate = latency_rate or max(1.0, w.readings_per_s / 2 / size)
        broker = fresh_broker()
        try:
            at_rate = receipt_latency(url, broker, workdir, workers, pubs, rate, seconds)
        finally:
            broker.kill()
        inside = at_rate["inside_gateway"]
        out["gateway"]["at_half_peak"] = {
            "envelopes_per_s": round(rate, 1),
            "fixed_rate": latency_rate is not None,
            **at_rate,
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


def _amqp_drain(
    url: str,
    rabbit: RabbitTarget,
    pubs: Publishers,
    seconds: float,
    size: int,
    workdir: Path,
    workers: int,
) -> dict[str, Any]:
    """The gateway's drain window fed from RabbitMQ: the same backlog published over MQTT
    3.1.1 into the node's uplink quorum queue first, then consumed over AMQP."""
    node = rabbit.entry
    reset(url)
    fresh_uplink(node, rabbit.shards)
    backlog = pubs.run("127.0.0.1", node.mqtt_port, None, BACKLOG_MAX_S, login=rabbit.login)[0]
    roots = rabbit.broker_roots
    with (
        gateway_processes(
            url, None, workdir, workers, amqp_url=node.amqp_url, amqp_shards=rabbit.shards
        ) as (pid, _),
        Memory(pid) as mem,
    ):
        m0 = time.monotonic()
        w, cpu = _drain_window(url, seconds, backlog * size, [pid], size, roots)
        memory = mem.summary(m0, time.monotonic())
    return {
        "readings_per_s": round(w.readings_per_s),
        "backlog_at_end": w.backlog_at_end,
        "backlog_envelopes": backlog,
        "readings_refused": _refused(url),
        "memory_at_peak": memory,
        "cpu": cpu,
    }


async def run(
    server_url: str,
    *,
    seconds: float = 4.0,
    slow_seconds: float | None = None,
    latency_rate: float | None = None,
    sizes: Sequence[int] = SIZES,
    workers: int = WORKERS,
    hubs: int = HUBS,
    amqp: bool = False,
    amqp_nodes: int = 1,
    amqp_shards: int = 1,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """``amqp``: also the gateway fed from a private RabbitMQ node (``gateway_amqp`` in each
    size's result, with its ratio to the gateway on Mosquitto in the same run)."""
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
        with (
            tempfile.TemporaryDirectory(prefix="trialstream-bench-ingest-") as tmp,
            rabbit_target(Path(tmp), amqp_nodes, amqp_shards)
            if amqp
            else contextlib.nullcontext() as rabbit,
        ):
            if rabbit is not None:
                say(f"RabbitMQ for the AMQP path: {', '.join(n.name for n in rabbit.nodes)}")
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
                    rabbit=rabbit,
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
            "gateway_amqp": f"the same backlog published over MQTT 3.1.1 into the uplink's"
            f" {amqp_shards} quorum queue(s) of a private RabbitMQ cluster of {amqp_nodes}"
            " node(s) (through the first node, where a single queue is led), the gateway"
            " consuming it over AMQP; broker CPU: every node's"
            if amqp
            else None,
            "latency": "publish() -> receipt arrival, at half the gateway's peak rate"
            if latency_rate is None
            else f"publish() -> receipt arrival, at {latency_rate:g} envelopes/s (fixed)",
            "database_slowed": f"every envelope INSERT sleeps {SLOW_STATEMENT_S} s while"
            f" {SLOW_RATE:,.0f} envelopes/s are published",
        },
        "results": results,
    }
