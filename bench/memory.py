"""``trialstream bench memory``: one gateway worker's resident memory under a flood of the
largest envelopes it stores, against the same worker at rest and under a flood of ordinary
envelopes, in the same run.

A worker holds what it has taken from the broker and not yet acknowledged: at most
``MAX_UNACKED`` messages and ``MAX_UNACKED_BYTES`` of their payloads
(``gateway.consumer``). With ordinary envelopes (10 readings, 530 bytes) the count
binds, a megabyte or so; with envelopes near ``MAX_ENVELOPE_BYTES`` the count alone would
let a worker hold hundreds of megabytes, and the byte budget is what bounds it. This
benchmark makes that the case and measures what the worker's resident set does then.

Load: envelopes from several simulated hubs (devices, participants and consent in a scratch
database, plain mode), sealed before the gateway starts, published at QoS 1 as fast as the
broker takes them by publisher processes (:mod:`bench.mqtt_raw`) into a private Mosquitto
(the deploy config, plain loopback), far faster than one worker stores them: the backlog
waits at the broker and in TCP buffers, and the worker takes more only as it acknowledges.

- ``large``: 1,000 readings per envelope (``MAX_ITEMS_PER_ENVELOPE``) of the metric with
  the longest name, each with a sensor name of ``MAX_SENSOR_BYTES``: the largest envelope
  whose readings are all stored (a larger one needs metric names or units no metric has,
  whose readings the gateway refuses);
- ``ordinary``: 10 readings per envelope, as in ``bench ingest``.

Each flood gets a fresh broker and a fresh ``gateway --workers 1``. The worker process's
RSS is sampled with psutil every 50 ms: at rest for a few seconds once it is connected
(``idle``), then through the flood (``peak``; ``peak_hwm`` is the kernel's high-water mark,
``VmHWM``, which no sampling interval misses), ``steady`` while the middle half of the flood
is stored (the median), and ``after`` once all of it is. At the end every envelope
published must be in ``envelopes`` with all its readings in ``readings``: a flood that lost
data would measure nothing.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import psutil  # type: ignore[import-untyped]
import psycopg

from bench.common import (
    BenchHub,
    Progress,
    database_name,
    machine,
    scratch_database,
    server_version,
)
from bench.gateway_process import gateway_processes, inside_gateway, scrape
from bench.load import (
    READING_STEP_MS,
    create_trial,
    publish,
    reset,
    seal_pool,
    stop_processes,
)
from gateway.broker import MosquittoBroker
from gateway.consumer import MAX_UNACKED, MAX_UNACKED_BYTES
from ingest.envelope import MAX_ENVELOPE_BYTES, MAX_ITEMS_PER_ENVELOPE, MAX_SENSOR_BYTES, seal
from ingest.model import Payload, Reading

HUBS = 8
PUBLISHERS = 2
# Defaults: the large flood is eight byte budgets (519 MiB), the ordinary one fifteen times
# the count cap; with the setup, one to two minutes on two cores.
LARGE_ENVELOPES = 3_200
ORDINARY_ENVELOPES = 30_000
LARGE_READINGS = MAX_ITEMS_PER_ENVELOPE
ORDINARY_READINGS = 10
# The metric with the longest name, and values in its range (36.0-37.9 Cel).
LARGE_METRIC = ("body_temperature", "Cel", 36.0)
# The worker at rest, connected and subscribed, before the flood.
IDLE_S = 3.0
# After the last envelope is stored: what the worker keeps.
AFTER_S = 2.0
SAMPLE_S = 0.05
# How often the stored envelopes are counted (and the timeline gets a point).
COUNT_S = 0.5
# No envelope stored for this long while some are missing: the flood is given up on.
STALL_S = 60.0
# A publisher stops after this long whatever is left of its pool.
PUBLISH_MAX_S = 300.0

MIB = 1024 * 1024


# --- the load (publisher processes) ---------------------------------------------------------


def _sensor_name(dev: str) -> str:
    """A printable sensor name of exactly ``MAX_SENSOR_BYTES`` bytes, one per hub."""
    return (f"{dev}/thermometer/" + "0123456789abcdef" * MAX_SENSOR_BYTES)[:MAX_SENSOR_BYTES]


def _seal_large(hubs: Sequence[BenchHub], per_hub: int, t0_ms: int) -> list[bytes]:
    """``per_hub`` envelopes of ``LARGE_READINGS`` readings for each hub, in the order
    :func:`bench.load.publish` sends them (hub after hub, then the next seq)."""
    metric, unit, base_value = LARGE_METRIC
    loaded = [(h.device_id, h.key(), _sensor_name(h.device_id)) for h in hubs]
    pool: list[bytes] = []
    for seq in range(1, per_hub + 1):
        for dev, key, sensor in loaded:
            base = t0_ms + (seq - 1) * LARGE_READINGS * READING_STEP_MS
            readings = tuple(
                Reading(
                    base + i * READING_STEP_MS,
                    metric,
                    base_value + (seq + i) % 20 / 10,
                    unit,
                    sensor,
                )
                for i in range(LARGE_READINGS)
            )
            sent = base + LARGE_READINGS * READING_STEP_MS
            pool.append(seal(Payload(dev, seq, sent, readings), key))
    return pool


def _publisher_main(
    conn: Connection, hubs: list[BenchHub], kind: str, per_hub: int, t0_ms: int, name: str
) -> None:
    if kind == "large":
        pool = _seal_large(hubs, per_hub, t0_ms)
    else:
        pool = seal_pool(hubs, ORDINARY_READINGS, per_hub, t0_ms)
    conn.send((len(pool), sum(len(p) for p in pool), max(len(p) for p in pool)))
    cmd = conn.recv()
    if cmd is None:
        return
    host, port, start_at = cmd
    topics = [f"dct/v1/{h.device_id}/up" for h in hubs]
    sent, _ = publish(pool, topics, host, port, None, start_at, PUBLISH_MAX_S, name)
    conn.send(sent)


class _Flood:
    """Publisher processes, each sealing its hubs' share of the flood at start; ``start``
    sends it all once, as fast as the broker acknowledges."""

    def __init__(self, hubs: Sequence[BenchHub], kind: str, envelopes: int, t0_ms: int) -> None:
        ctx = mp.get_context("spawn")
        n = min(PUBLISHERS, len(hubs))
        per_hub = max(1, -(-envelopes // len(hubs)))
        self._pipes: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_publisher_main,
                args=(child, list(hubs[i::n]), kind, per_hub, t0_ms, f"{kind}-{i}"),
                name=f"bench-flood-{i}",
            )
            p.start()
            self._pipes.append(parent)
            self._procs.append(p)
        sealed = [pipe.recv() for pipe in self._pipes]
        self.envelopes = sum(s[0] for s in sealed)
        self.bytes = sum(s[1] for s in sealed)
        self.max_bytes = max(s[2] for s in sealed)
        self._results: list[int | None] = [None] * n

    def start(self, host: str, port: int) -> None:
        start_at = time.monotonic() + 0.2
        for pipe in self._pipes:
            pipe.send((host, port, start_at))

    def published(self) -> int | None:
        """Envelopes published and acknowledged by the broker, once every publisher is done."""
        for i, pipe in enumerate(self._pipes):
            if self._results[i] is None and pipe.poll():
                try:
                    self._results[i] = int(pipe.recv())
                except EOFError:
                    raise RuntimeError(f"publisher {i} failed (its traceback is above)") from None
        done = [r for r in self._results if r is not None]
        return sum(done) if len(done) == len(self._results) else None

    def close(self) -> None:
        stop_processes(self._pipes, self._procs)


# --- the worker's memory --------------------------------------------------------------------


def _worker_pid(supervisor: int, timeout_s: float = 10.0) -> int:
    """The one gateway worker under ``supervisor`` (a spawned child; not the resource
    tracker multiprocessing may start beside it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for child in psutil.Process(supervisor).children():
            with contextlib.suppress(psutil.Error):
                if any("spawn_main" in part for part in child.cmdline()):
                    found.append(child.pid)
        if len(found) == 1:
            return int(found[0])
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected one gateway worker under pid {supervisor}: {found}")
        time.sleep(0.1)


def _high_water_mark(pid: int) -> int | None:
    """The process's peak resident set so far (``VmHWM``), in bytes; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class _Rss:
    """Samples one process's resident set in a thread."""

    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    gone: bool = False

    def __post_init__(self) -> None:
        self._proc = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                rss = int(self._proc.memory_info().rss)
            except psutil.Error:
                self.gone = True
                return
            self.samples.append((time.monotonic(), rss))
            if self._stop.wait(SAMPLE_S):
                return

    def __enter__(self) -> _Rss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t <= end]


def _mib(n: float | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


# --- one flood ------------------------------------------------------------------------------


def _stored_envelopes(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM envelopes").fetchone()
    return int(row[0]) if row else 0


def _final_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM envelopes),"
            " (SELECT coalesce(sum(stored_count), 0) FROM envelopes),"
            " (SELECT count(*) FROM readings),"
            " (SELECT count(*) FROM rejections WHERE seq IS NULL OR (device_id, seq) NOT IN"
            "  (SELECT device_id, seq FROM envelopes)),"
            " (SELECT coalesce(sum(reading_count), 0) FROM rejections)"
        ).fetchone()
    assert row is not None
    keys = (
        "envelopes_stored",
        "readings_in_envelope_rows",
        "readings_stored",
        "envelopes_rejected",
        "readings_refused",
    )
    return dict(zip(keys, (int(v) for v in row), strict=True))


@dataclass
class _Drain:
    timeline: list[tuple[float, int]]  # (monotonic time, envelopes stored)
    published: int
    stored: int
    started: float
    ended: float
    published_at: float | None  # when the last publisher had every PUBACK back


def _drain(url: str, flood: _Flood, say: Progress, kind: str) -> _Drain:
    """Counts stored envelopes until the whole flood is stored (or nothing more is stored
    for ``STALL_S``)."""
    started = time.monotonic()
    timeline: list[tuple[float, int]] = [(started, 0)]
    progress_at = last_said = started
    published_at: float | None = None
    stored = 0
    while True:
        time.sleep(COUNT_S)
        now_stored = _stored_envelopes(url)
        now = time.monotonic()
        timeline.append((now, now_stored))
        if now_stored > stored:
            stored, progress_at = now_stored, now
        published = flood.published()
        if published is not None and published_at is None:
            published_at = now
        if published is not None and stored >= published:
            return _Drain(timeline, published, stored, started, now, published_at)
        if now - progress_at > STALL_S:
            say(f"{kind}: nothing stored for {STALL_S:.0f} s, {stored:,} envelopes stored")
            return _Drain(
                timeline, published or flood.envelopes, stored, started, now, published_at
            )
        if now - last_said >= 10:
            last_said = now
            say(f"{kind}: {stored:,} of {flood.envelopes:,} envelopes stored")


def _run_flood(
    url: str,
    hubs: Sequence[BenchHub],
    kind: str,
    envelopes: int,
    t0_ms: int,
    workdir: Path,
    say: Progress,
    idle_s: float,
) -> dict[str, Any]:
    readings_per_envelope = LARGE_READINGS if kind == "large" else ORDINARY_READINGS
    reset(url)
    say(f"{kind}: sealing {envelopes:,} envelopes of {readings_per_envelope} readings")
    flood = _Flood(hubs, kind, envelopes, t0_ms)
    broker = MosquittoBroker(workdir / f"mosquitto-{kind}")
    broker.start()
    try:
        with gateway_processes(url, broker, workdir, 1) as (supervisor, http_port):
            worker = _worker_pid(supervisor)
            with _Rss(worker) as rss:
                time.sleep(idle_s)
                idle_end = time.monotonic()
                say(
                    f"{kind}: worker at rest {_mib(statistics.median(rss.between(0, idle_end)))}"
                    f" MiB; publishing {flood.envelopes:,} envelopes, {flood.bytes / MIB:,.0f} MiB"
                )
                flood.start(broker.host, broker.port)
                drained = _drain(url, flood, say, kind)
                time.sleep(AFTER_S)
                after_end = time.monotonic()
            hwm = _high_water_mark(worker)
            try:
                now_worker: int | None = _worker_pid(supervisor)
            except RuntimeError:  # the worker died and is not back yet
                now_worker = None
            inside = inside_gateway(scrape(http_port, 1))
    finally:
        broker.kill()
        flood.close()
    counts = _final_counts(url)
    expected_readings = drained.published * readings_per_envelope
    all_stored = (
        counts["envelopes_stored"] == drained.published
        and counts["readings_stored"] == expected_readings
        and counts["readings_in_envelope_rows"] == expected_readings
    )

    idle = rss.between(0, idle_end)
    during = rss.between(drained.started, drained.ended)
    # The middle half of the flood: from a quarter of it stored to three quarters.
    quarter = [t for t, n in drained.timeline if n >= drained.published / 4]
    three_quarters = [t for t, n in drained.timeline if n >= drained.published * 3 / 4]
    middle = (
        rss.between(quarter[0], three_quarters[0]) if quarter and three_quarters else []
    ) or during
    after = rss.between(drained.ended, after_end)
    seconds = drained.ended - drained.started
    # About a point a second: [seconds into the flood, the worker's highest RSS since the
    # point before, envelopes stored].
    timeline: list[list[float | int | None]] = []
    last_t = drained.started
    for t, n in drained.timeline[1:]:
        if t - last_t >= 1.0 or t == drained.ended:
            span = rss.between(last_t, t)
            timeline.append([round(t - drained.started, 1), _mib(max(span)) if span else None, n])
            last_t = t
    out: dict[str, Any] = {
        "readings_per_envelope": readings_per_envelope,
        "envelope_bytes_mean": round(flood.bytes / flood.envelopes),
        "envelope_bytes_max": flood.max_bytes,
        "envelopes_published": drained.published,
        "mib_published": round(flood.bytes * drained.published / flood.envelopes / MIB, 1),
        **counts,
        "readings_expected": expected_readings,
        "all_stored": all_stored,
        "worker_restarted": now_worker != worker or rss.gone,
        "published_in_s": round(drained.published_at - drained.started, 1)
        if drained.published_at is not None
        else None,
        "drain_s": round(seconds, 1),
        "stored_per_s": {
            "envelopes": round(drained.stored / seconds, 1) if seconds else None,
            "readings": round(drained.stored * readings_per_envelope / seconds)
            if seconds
            else None,
            "mib": round(drained.stored * flood.bytes / flood.envelopes / MIB / seconds, 2)
            if seconds
            else None,
        },
        "worker_rss_mib": {
            "idle": _mib(statistics.median(idle)) if idle else None,
            "peak": _mib(max(during)) if during else None,
            "peak_hwm": _mib(hwm),
            "steady": _mib(statistics.median(middle)) if middle else None,
            "after": _mib(statistics.median(after)) if after else None,
            "samples": len(rss.samples),
        },
        "timeline_s_mib_stored": timeline,
        "inside_gateway": inside,
    }
    say(
        f"{kind}: {drained.stored:,} of {drained.published:,} envelopes stored in "
        f"{seconds:.1f} s; worker RSS {out['worker_rss_mib']}"
    )
    return out


def _highest(*values: float | None) -> float | None:
    """The higher of a sampled peak and the kernel's high-water mark (they are read apart,
    one from statm and one from status, and may differ by a page or two)."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


async def run(
    server_url: str,
    *,
    envelopes: int = LARGE_ENVELOPES,
    ordinary_envelopes: int = ORDINARY_ENVELOPES,
    hubs: int = HUBS,
    idle_s: float = IDLE_S,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    say = Progress(progress)
    floods: dict[str, dict[str, Any]] = {}
    async with scratch_database(server_url, "trialstream_bench_memory") as url:
        version = await server_version(url)
        t0_ms = int((time.time() - 86_400) * 1000)
        simulated = await create_trial(url, hubs, t0_ms - 86_400_000, 3 * 86_400_000)
        say(f"scratch database {database_name(url)}: {hubs} hubs, participants consented")
        with tempfile.TemporaryDirectory(prefix="trialstream-bench-memory-") as tmp:
            for kind, count in (("ordinary", ordinary_envelopes), ("large", envelopes)):
                floods[kind] = _run_flood(
                    url, simulated, kind, count, t0_ms, Path(tmp), say, idle_s
                )
    large, ordinary = floods["large"]["worker_rss_mib"], floods["ordinary"]["worker_rss_mib"]
    large_bytes = floods["large"]["envelope_bytes_mean"]
    budget_mib = MAX_UNACKED_BYTES / MIB
    peak = _highest(large["peak"], large["peak_hwm"])
    ordinary_peak = _highest(ordinary["peak"], ordinary["peak_hwm"])
    return {
        "benchmark": "memory",
        "machine": machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "postgresql": version,
        "method": {
            "hubs": hubs,
            "publisher_processes": min(PUBLISHERS, hubs),
            "gateway": "python -m gateway.cli gateway --workers 1, fresh per flood",
            "broker": "private Mosquitto (deploy config), plain loopback, fresh per flood",
            "load": "every envelope sealed before the gateway starts, then published once at"
            " QoS 1 as fast as the broker acknowledges",
            "large": f"{LARGE_READINGS} readings of {LARGE_METRIC[0]} per envelope, sensor"
            f" names of {MAX_SENSOR_BYTES} bytes",
            "ordinary": f"{ORDINARY_READINGS} readings per envelope (as bench ingest)",
            "rss": f"the worker process, psutil every {SAMPLE_S * 1000:.0f} ms; idle: median"
            f" over {idle_s:g} s at rest before the flood; peak: highest sample in the flood;"
            " peak_hwm: VmHWM; steady: median while the middle half of the flood was stored;"
            f" after: median over {AFTER_S:g} s once all was stored",
        },
        "limits": {
            "max_envelope_bytes": MAX_ENVELOPE_BYTES,
            "max_unacked_messages": MAX_UNACKED,
            "max_unacked_bytes_mib": round(budget_mib, 1),
            "large_envelope_share_of_max": round(large_bytes / MAX_ENVELOPE_BYTES, 2),
            "large_envelopes_in_byte_budget": MAX_UNACKED_BYTES // large_bytes,
            "large_held_by_message_cap_alone_mib": round(MAX_UNACKED * large_bytes / MIB, 1),
        },
        "floods": floods,
        "summary": {
            "large_peak_mib": peak,
            "large_steady_mib": large["steady"],
            "idle_mib": large["idle"],
            "ordinary_peak_mib": ordinary_peak,
            "peak_to_idle": _ratio(peak, large["idle"]),
            "peak_to_ordinary_peak": _ratio(peak, ordinary_peak),
            "steady_to_idle": _ratio(large["steady"], large["idle"]),
            "idle_plus_budget_mib": round(large["idle"] + budget_mib, 1)
            if large["idle"] is not None
            else None,
            "peak_above_idle_mib": round(peak - large["idle"], 1)
            if peak is not None and large["idle"] is not None
            else None,
            "peak_above_idle_per_budget": _ratio(
                peak - large["idle"] if peak is not None and large["idle"] is not None else None,
                budget_mib,
            ),
            "all_stored": all(f["all_stored"] for f in floods.values()),
        },
    }
